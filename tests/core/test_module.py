import errno

import h5py
import pytest
import torch
from small_model import SMALL_MODEL
from small_model import quiet_trainer as trainer

from dti_sprites.callbacks import PredictionWriter
from dti_sprites.datamodules.pipeline.hdf5_writer import HDF5Writer
from dti_sprites.io import partial_path
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule

MODEL = {**SMALL_MODEL, "greedy_passes": 2, "sprite_transforms": [], "background_init": "mean"}


def test_penalty_is_logged_but_carries_no_gradient():
    torch.manual_seed(0)
    module = DTISpritesModule(DTISprites(**MODEL, empty_penalty=0.5))
    out = module.model(torch.rand(6, 3, 20, 20))
    terms = module.objective(out)
    torch.testing.assert_close(terms["penalty"], 0.5 * out.n_nonempty.float().mean())
    grads = torch.autograd.grad(
        terms["objective"], list(module.model.parameters()), retain_graph=True, allow_unused=True
    )
    mse_grads = torch.autograd.grad(
        terms["mse"], list(module.model.parameters()), allow_unused=True
    )
    for g, h in zip(grads, mse_grads, strict=True):
        assert (g is None and h is None) or torch.equal(g, h)


def test_penalty_is_a_term_only_where_it_can_change_a_choice():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 20, 20)
    # No empty sprite (Tetrominoes): every candidate pays λ alike; only the MSE is a term.
    no_empty = DTISpritesModule(DTISprites(**{**MODEL, "empty_sprite": False}, empty_penalty=0.5))
    assert set(no_empty.objective(no_empty.model(x))) == {"mse"}
    # Frozen sprites: the empty sprite is no candidate, λ is off.
    module = DTISpritesModule(DTISprites(**MODEL, empty_penalty=0.5))
    module.model.freeze_sprites(True)
    terms = module.objective(module.model(x))
    assert float(terms["penalty"]) == 0.0
    torch.testing.assert_close(terms["objective"], terms["mse"])


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_optimizer_groups_hold_every_parameter_once(multiplier):
    module = DTISpritesModule(
        DTISprites(**MODEL),
        lr=1e-3,
        weight_decay=1e-6,
        encoder_lr_multiplier=multiplier,
        prototype_lr_multiplier=10 * multiplier,
    )
    optimizer = module.configure_optimizers()
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in module.parameters()}
    groups = {g["name"]: g for g in optimizer.param_groups}
    model = module.model
    prototypes = {id(model.sprites.appearance), id(model.sprites.mask), id(model.backgrounds.image)}
    assert {id(p) for p in groups["prototypes"]["params"]} == prototypes
    assert groups["prototypes"]["weight_decay"] == 0.0
    assert groups["networks"]["weight_decay"] == 1e-6
    assert groups["prototypes"]["lr"] == pytest.approx(1e-2 * multiplier)
    assert groups["networks"]["lr"] == pytest.approx(1e-3)
    if multiplier != 1.0:
        assert groups["encoder"]["lr"] == pytest.approx(module.hparams.lr * multiplier)


def test_fit_initialises_mean_background_and_logs_both_terms(tmp_path, squares):
    torch.manual_seed(0)
    data = squares(n=8)
    module = DTISpritesModule(DTISprites(**MODEL), init_images=8)
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    t.fit(module, data)
    assert bool(module.model.backgrounds.initialised)
    for key in (
        "train/mse",
        "train/penalty",
        "train/objective",
        "val/paper320/ari_fg",
        "val/heldout/miou",
        "usage/sprite_0",
    ):
        assert key in t.callback_metrics, key


def test_image_size_mismatch_is_rejected_before_training(tmp_path, squares):
    module = DTISpritesModule(DTISprites(**{**MODEL, "image_size": 24}))
    with pytest.raises(ValueError, match="image_size is 24"):
        trainer(tmp_path).fit(module, squares(image_size=20))


def test_test_reports_both_protocols_and_prints_a_table(tmp_path, squares, capsys):
    module = DTISpritesModule(DTISprites(**MODEL))
    results = trainer(tmp_path).test(module, squares(n=8), verbose=False)
    keys = set().union(*results)
    for key in (
        "test/paper320/ari",
        "test/paper320/ari_fg",
        "test/heldout/macc",
        "test/heldout/miou",
        "test/heldout/global_acc",
    ):
        assert key in keys
    printed = capsys.readouterr().out
    assert "Test results" in printed and "paper320" in printed and "ari_fg" in printed


def test_predict_writes_predictions_h5(tmp_path, squares):
    data = squares(n=6)
    module = DTISpritesModule(DTISprites(**MODEL))
    t = trainer(tmp_path, callbacks=[PredictionWriter()])
    t.predict(module, data, return_predictions=False)
    with h5py.File(tmp_path / "predictions.h5") as f:
        assert f["reconstruction"].shape == (6, 20, 20, 3) and f["reconstruction"].dtype == "uint8"
        assert f["instance"].shape == (6, 20, 20) and f["instance"].dtype == "uint8"
        assert f["instance_fg"].shape == (6, 20, 20) and f["instance_fg"].dtype == "uint8"
        assert f["semantic"].dtype == "uint8" and f["semantic"][()].max() <= 3
        assert f["layers"].shape == (6, 2, 20, 20, 4) and f["layers"].dtype == "uint8"
        assert f["sprite_choice"].shape == (6, 2) and f["sprite_choice"].dtype == "int16"
        assert f["index"][()].tolist() == list(range(6))
    assert not partial_path(tmp_path / "predictions.h5").exists()


def test_model_rebuilds_from_a_training_checkpoint(tmp_path, squares):
    torch.manual_seed(0)
    module = DTISpritesModule(DTISprites(**MODEL))
    t = trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    t.fit(module, squares(n=4))
    t.save_checkpoint(tmp_path / "model.ckpt")
    model = DTISprites.from_checkpoint(tmp_path / "model.ckpt")
    x = torch.rand(2, 3, 20, 20)
    module.model.eval()
    torch.testing.assert_close(model(x).reconstruction, module.model(x).reconstruction)


def test_a_failed_prediction_write_keeps_the_previous_file(tmp_path, squares, monkeypatch):
    data = squares(n=6)  # two batches of 4 and 2
    module = DTISpritesModule(DTISprites(**MODEL))
    trainer(tmp_path, callbacks=[PredictionWriter()]).predict(
        module, data, return_predictions=False
    )
    good = (tmp_path / "predictions.h5").read_bytes()
    original, calls = HDF5Writer.append, []

    def disk_full_on_second_batch(self, arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, arrays)

    monkeypatch.setattr(HDF5Writer, "append", disk_full_on_second_batch)
    with pytest.raises(OSError, match="No space left"):
        trainer(tmp_path, callbacks=[PredictionWriter()]).predict(
            module, data, return_predictions=False
        )
    assert (tmp_path / "predictions.h5").read_bytes() == good  # the earlier file is intact
    assert not partial_path(tmp_path / "predictions.h5").exists()  # and no half file is left
