import warnings

import lightning as L
import pytest
import torch
from small_model import SMALL_MODEL, quiet_trainer

from dti_sprites.callbacks import (
    Curriculum,
    EvalReport,
    LayerReset,
    SpriteFreeze,
    SpriteReassignment,
    ValidationRefinement,
)
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule
from dti_sprites.optim import LRDrops, MilestoneDrops

MODEL = SMALL_MODEL


class Probe(L.Callback):
    """Records, at the first training batch of each epoch, what the other callbacks set."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            model = pl_module.model
            self.seen.append(
                {
                    "epoch": trainer.current_epoch,
                    "sprite_active": int(model.sprite_transforms.n_active),
                    "frozen": bool(model.sprites_frozen),
                    "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
                    "appearance": model.sprites.appearance.detach().clone(),
                }
            )


def fit(tmp_path, squares, callbacks, epochs=3, batches=2, lr=1e-2, lr_drops=None, **model):
    torch.manual_seed(0)
    module = DTISpritesModule(DTISprites(**{**MODEL, **model}), lr=lr, lr_drops=lr_drops)
    probe = Probe()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[*callbacks, probe],
    )
    trainer.fit(module, squares(n=8))
    return module, probe.seen


def test_curriculum_switches_modules_on_at_milestones(tmp_path, squares):
    curriculum = Curriculum(sprite=[2])
    module, seen = fit(tmp_path, squares, [curriculum])
    assert [s["sprite_active"] for s in seen] == [0, 0, 1]
    assert curriculum.state_dict()["n_active"]["sprite"] == 1
    assert Curriculum(layer=[3, 5]).stage(n_modules=3, milestones=[3, 5], time=4) == 2
    with pytest.raises(ValueError, match=r"Curriculum\.background"):
        Curriculum(background=[1, 2]).apply(module, 0)


class StepProbe(L.Callback):
    """The sprite sequence's active modules at every training step (after the others)."""

    def __init__(self):
        self.active = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active.append(int(pl_module.model.sprite_transforms.n_active))


def test_curriculum_in_steps_switches_on_mid_epoch(tmp_path, squares):
    # 3 epochs of 2 steps; milestone 3: the 4th step (the second of epoch 1) has the module.
    probe = StepProbe()
    fit(tmp_path, squares, [Curriculum(sprite=[3], interval="step"), probe])
    assert probe.active == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="interval"):
        Curriculum(sprite=[3], interval="steps")


def test_freeze_keeps_sprites_fixed_for_the_first_epochs(tmp_path, squares):
    module, seen = fit(tmp_path, squares, [SpriteFreeze(epochs=2)], lr=1e-3, empty_sprite=False)
    assert [s["frozen"] for s in seen] == [True, True, False]
    torch.testing.assert_close(seen[1]["appearance"], seen[0]["appearance"], rtol=0, atol=0)
    assert not torch.equal(module.model.sprites.appearance, seen[2]["appearance"])
    assert not bool(module.model.sprites_frozen)  # released after fit


def test_lr_drops_apply_per_group_gammas(tmp_path, squares):
    drops = LRDrops(milestones=(1, 2), gammas=(1.0, 0.1))
    module, seen = fit(tmp_path, squares, [], lr_drops=drops)
    lrs = [s["lr"] for s in seen]
    assert lrs[0] == pytest.approx([1e-2, 1e-2])
    assert lrs[1] == pytest.approx([1e-2, 1e-3])
    assert lrs[2] == pytest.approx([1e-2, 1e-4])
    (config,) = module.trainer.lr_scheduler_configs  # Lightning's LR scheduler
    assert isinstance(config.scheduler, MilestoneDrops) and config.interval == "epoch"
    assert config.scheduler.drops == 2
    with pytest.raises(ValueError, match=r"LRDrops\.gammas"):
        fit(tmp_path, squares, [], epochs=1, lr_drops=LRDrops((1,), (1.0, 0.1, 0.5)))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()` before")
def test_lr_drops_count_steps_when_asked():
    module = DTISpritesModule(
        DTISprites(image_size=20, n_sprites=3, n_layers=2, sprite_size=12),
        lr_drops=LRDrops(milestones=(3, 5), gammas=(0.5,), interval="step"),
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(7):  # Lightning steps the scheduler after every optimizer step
        seen.append(optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"])
        scheduler.step()
    assert seen == pytest.approx([1, 1, 1, 0.5, 0.5, 0.25, 0.25])
    assert scheduler.drops == 2


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()` before")
def test_lr_drops_give_a_separate_encoder_group_the_networks_gamma():
    module = DTISpritesModule(
        DTISprites(image_size=20, n_sprites=3, n_layers=2, sprite_size=12),
        lr=1e-2,
        encoder_updates_per_step=3,
        lr_drops=LRDrops(milestones=(1,), gammas=(1.0, 0.1)),
    )
    config = module.configure_optimizers()
    config["lr_scheduler"]["scheduler"].step()  # the end of epoch 0
    lrs = {g["name"]: g["lr"] for g in config["optimizer"].param_groups}
    assert lrs == pytest.approx({"prototypes": 1e-2, "networks": 1e-3, "encoder": 1e-3})


def test_reassignment_copies_sprite_heads_and_optimizer_state(tmp_path, squares):
    module, _ = fit(tmp_path, squares, [], epochs=1)
    model = module.model
    optimizer = torch.optim.Adam(module.parameter_groups())
    model(torch.rand(4, 3, 20, 20)).mse.mean().backward()
    # Give every head a distinct gradient history so that copies are visible.
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.randn_like(p)
    optimizer.step()
    callback = SpriteReassignment(threshold=0.5, noise_std=1e-4, seed=3)
    counts = torch.tensor([50.0, 1.0, 40.0])  # sprite 1 under 0.5/3 of the most used
    assert callback.unused(counts, empty_sprite=True) == [1]
    assert callback.unused(counts, empty_sprite=False) == [1]
    events = callback.reassign(module, optimizer, counts, step=7)
    assert events == [{"step": 7, "src": 0, "dst": 1}]
    noise = model.sprites.appearance[1] - model.sprites.appearance[0]
    assert 0 < noise.abs().max() < 1e-3
    torch.testing.assert_close(model.sprites.mask[1], model.sprites.mask[0])
    head = model.sprite_transforms.heads[0]
    for layer in range(model.n_layers):
        torch.testing.assert_close(head.weights[0][:, layer * 3 + 1], head.weights[0][:, layer * 3])
    state = optimizer.state[model.sprites.mask]
    torch.testing.assert_close(state["exp_avg"][1], state["exp_avg"][0])
    state["exp_avg"][0] += 1  # cloned, never shared
    assert not torch.equal(state["exp_avg"][1], state["exp_avg"][0])
    # The same seed and step give the same noise (identical on every DDP rank).
    other = SpriteReassignment(threshold=0.5, noise_std=1e-4, seed=3)
    before = model.sprites.appearance[0].clone()
    other.reassign(module, optimizer, counts, step=7)
    torch.testing.assert_close(model.sprites.appearance[1] - before, noise)


def test_reassignment_fires_every_n_steps_and_not_while_frozen(tmp_path, squares):
    callback = SpriteReassignment(every_n_steps=2, threshold=10.0)  # every sprite "unused"
    fit(
        tmp_path,
        squares,
        [SpriteFreeze(epochs=1), callback],
        epochs=2,
        batches=2,
        empty_sprite=False,
    )
    steps = [e["step"] for e in callback.events]
    assert steps and min(steps) >= 3  # nothing during the frozen first epoch (steps 1-2)
    assert callback.state_dict()["steps"] == 0
    restored = SpriteReassignment()
    restored.load_state_dict(callback.state_dict())
    assert restored.events == callback.events


class ShrinkLayer(L.Callback):
    """Before training, shrinks layer 1's sprite to a dot in every image (scale 1 + e⁶)."""

    def on_train_start(self, trainer, pl_module):
        position = pl_module.model.layer_transforms.heads[1]  # heads: colour, position
        with torch.no_grad():
            position.biases[-1][1, 0] = 6.0


def test_layer_reset_puts_back_a_layer_that_shrank_out_of_use(tmp_path, squares):
    callback = LayerReset(every_n_steps=2, min_share=0.2)
    module, _ = fit(
        tmp_path, squares, [ShrinkLayer(), callback], epochs=1, lr=1e-9, empty_sprite=False
    )
    assert callback.events == [{"step": 2, "layer": 1}]
    position = module.model.layer_transforms.heads[1]
    assert position.biases[-1][1].abs().max() == 0  # back at the initial placement
    optimizer = module.trainer.optimizers[0]
    state = optimizer.state[position.biases[-1]]
    assert state["exp_avg"][1].abs().max() == 0  # no momentum towards the dot
    assert state["exp_avg_sq"][1].max() > 0  # kept: the step size the head had
    assert state["exp_avg"][0].abs().max() > 0  # layer 0 kept
    restored = LayerReset()
    restored.load_state_dict(callback.state_dict())
    assert restored.events == callback.events and restored.steps == 0


def test_layer_reset_leaves_live_layers_and_stops_after_until(tmp_path, squares):
    live = LayerReset(every_n_steps=2)
    fit(tmp_path, squares, [live], epochs=1, lr=1e-9, empty_sprite=False)
    assert live.events == []
    late = LayerReset(every_n_steps=2, until=1)
    fit(tmp_path, squares, [ShrinkLayer(), late], epochs=1, lr=1e-9, empty_sprite=False)
    assert late.events == []


class RefinementProbe(L.Callback):
    """Records the refinement the model would run, at every validation, test and train step."""

    def __init__(self):
        self.validations, self.tests, self.training = [], [], []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and dataloader_idx == 0:
            model = pl_module.model
            self.validations.append((trainer.global_step, model._refining(), model.order_search))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and dataloader_idx == 0:
            self.tests.append(pl_module.model.refinement_settings())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.training.append(pl_module.model.refinement_settings())


def refinement_trainer(tmp_path, callbacks, max_steps, sanity_steps=1):
    """A quiet Trainer validating one batch every 2 steps (and ``sanity_steps`` first)."""
    return quiet_trainer(
        tmp_path,
        max_epochs=None,
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=sanity_steps,
        callbacks=callbacks,
    )


def test_validation_refinement_refines_only_from_its_step(tmp_path, squares):
    """Sanity check and the step-2 validation unrefined, steps 4 and 6 refined; the model's
    own settings everywhere else (training, test, the checkpoint's model after fit)."""
    torch.manual_seed(0)
    own = dict(
        pose_refinement=3,
        pose_refinement_lr=0.05,
        pose_refinement_rounds=2,
        order_search=True,
        residual_placement=0.1,
    )
    module = DTISpritesModule(DTISprites(**{**MODEL, **own}), lr=1e-2)
    probe = RefinementProbe()
    trainer = refinement_trainer(tmp_path, [ValidationRefinement(from_step=4), probe], 6)
    data = squares(n=8)
    trainer.fit(module, data)
    assert probe.validations == [
        (0, False, False),
        (2, False, False),
        (4, True, True),
        (6, True, True),
    ]
    assert probe.training and all(seen == own for seen in probe.training)
    assert module.model.refinement_settings() == own
    trainer.test(module, data, verbose=False)
    assert probe.tests == [own]


@pytest.mark.parametrize(
    "from_step, refined", [(None, [False, False, False, True]), (0, [False, True, True, True])]
)
def test_validation_refinement_by_default_refines_the_final_validation_only(
    tmp_path, squares, from_step, refined
):
    """Default: max_steps; the sanity check is never refined; a standalone validate is."""
    module = DTISpritesModule(DTISprites(**{**MODEL, "pose_refinement": 2}), lr=1e-2)
    probe = RefinementProbe()
    trainer = refinement_trainer(tmp_path, [ValidationRefinement(from_step), probe], 6)
    data = squares(n=8)
    trainer.fit(module, data)
    steps = [0, 2, 4, 6]
    assert probe.validations == [(t, r, False) for t, r in zip(steps, refined, strict=True)]
    trainer.validate(module, data, verbose=False)
    assert probe.validations[-1][1:] == (True, False)


def test_validation_refinement_needs_max_steps_by_default(tmp_path, squares):
    module = DTISpritesModule(DTISprites(**MODEL), lr=1e-2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[ValidationRefinement()])
    with pytest.raises(ValueError, match="max_steps is not set"):
        trainer.fit(module, squares(n=8))


class FailAt(L.Callback):
    """Raises in the first batch of the validation at step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise RuntimeError("failed validation")


def test_validation_refinement_puts_the_settings_back_after_an_error(tmp_path, squares):
    module = DTISpritesModule(DTISprites(**{**MODEL, "pose_refinement": 2}), lr=1e-2)
    own = module.model.refinement_settings()
    trainer = refinement_trainer(tmp_path, [ValidationRefinement(), FailAt(2)], 6)
    with pytest.raises(RuntimeError, match="failed validation"):
        trainer.fit(module, squares(n=8))
    assert module.model.refinement_settings() == own


@pytest.mark.parametrize("before_report", [True, False])
def test_validation_refinement_warns_when_listed_before_the_eval_report(
    tmp_path, squares, before_report
):
    refinement, report = ValidationRefinement(from_step=1), EvalReport()
    callbacks = [refinement, report] if before_report else [report, refinement]
    trainer = refinement_trainer(tmp_path, callbacks, 1, sanity_steps=0)
    module = DTISpritesModule(DTISprites(**MODEL), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, squares(n=8))
    found = [w for w in caught if "listed before EvalReport" in str(w.message)]
    assert len(found) == (1 if before_report else 0)


class StopAt(L.Callback):
    """Stops the fit at the end of step ``step``, as max_time or early stopping would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_validation_refinement_refines_the_validation_of_a_fit_stopped_early(tmp_path, squares):
    module = DTISpritesModule(DTISprites(**{**MODEL, "pose_refinement": 2}), lr=1e-2)
    probe = RefinementProbe()
    callbacks = [ValidationRefinement(from_step=10), StopAt(3), probe]
    trainer = refinement_trainer(tmp_path, callbacks, 10, sanity_steps=0)
    trainer.fit(module, squares(n=8))
    assert probe.validations == [(2, False, False), (3, True, False)]
