"""The optimizer: Adam with several updates of a group per step, as the authors' encoder gets."""

import warnings

import pytest
import torch

from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule
from dti_sprites.optim import Adam, reset_optimizer_state


def _train(make_optimizer, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shared, other = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4))
    optimizer = make_optimizer(shared, other)
    for step in range(steps):
        optimizer.zero_grad()
        loss = (shared.sin() * (step + 1)).sum() + (other**2).sum() + shared @ shared.flip(0)
        loss.backward()
        optimizer.step()
    return shared.detach().clone(), other.detach().clone()


@pytest.mark.parametrize("updates", [1, 3, 7])
def test_repeated_group_updates_equal_a_parameter_listed_that_many_times(updates):
    # The authors' optimizer lists the shared encoder once per module that holds it; torch's
    # (single-tensor) Adam then updates it once per listing, in turn, with the same gradient.
    def listed(shared, other):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about duplicate parameters
            return torch.optim.Adam(
                [{"params": [other]}, {"params": [shared] * updates, "weight_decay": 1e-2}],
                lr=1e-2,
                foreach=False,
            )

    def ours(shared, other):
        return Adam(
            [{"params": [other]}, {"params": [shared], "weight_decay": 1e-2, "updates": updates}],
            lr=1e-2,
        )

    expected, ours_result = _train(listed), _train(ours)
    torch.testing.assert_close(ours_result[0], expected[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(ours_result[1], expected[1], rtol=0, atol=0)


def test_only_the_repeated_group_moves_more():
    single = _train(lambda s, o: Adam([{"params": [s, o]}], lr=1e-2))
    repeated = _train(lambda s, o: Adam([{"params": [o]}, {"params": [s], "updates": 5}], lr=1e-2))
    torch.testing.assert_close(repeated[1], single[1], rtol=0, atol=0)
    assert not torch.allclose(repeated[0], single[0])


def test_module_gives_the_encoder_its_updates():
    model = DTISprites(image_size=20, n_sprites=3, n_layers=2, sprite_size=12, mask_std=3)
    module = DTISpritesModule(model, lr=1e-3, encoder_updates_per_step=7)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, Adam)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["encoder"]["updates"] == 7
    assert groups["encoder"]["lr"] == groups["networks"]["lr"] == pytest.approx(1e-3)
    encoder = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups["encoder"]["params"]} == encoder
    assert "updates" not in groups["networks"] and "updates" not in groups["prototypes"]
    # One update per step (the default) keeps the encoder in the networks group.
    default = DTISpritesModule(model).configure_optimizers()
    assert [g["name"] for g in default.param_groups] == ["prototypes", "networks"]


def test_reset_optimizer_state_zeroes_the_named_state_of_a_slice_only():
    p = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.Adam([p])
    p.grad = torch.ones(3, 2)
    optimizer.step()
    state = optimizer.state[p]
    reset_optimizer_state(optimizer, [(p, (1,))], keys=["exp_avg"])
    assert state["exp_avg"][1].abs().max() == 0 and state["exp_avg"][[0, 2]].min() > 0
    assert state["exp_avg_sq"].min() > 0  # not named: kept
    reset_optimizer_state(optimizer, [(p, (slice(None),))])  # every per-element tensor
    assert state["exp_avg"].abs().max() == 0 and state["exp_avg_sq"].abs().max() == 0
    assert state["step"] == 1  # scalar state stays
