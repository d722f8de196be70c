"""Exact resume, atomic checkpoints, and a non-finite loss stopping the run (issue 6)."""

import errno

import fsspec.implementations.local
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from small_model import SMALL_MODEL

from dti_sprites.callbacks import Curriculum, SpriteFreeze, SpriteReassignment
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule
from dti_sprites.optim import LRDrops

MODEL = {**SMALL_MODEL, "empty_sprite": False}
EPOCHS, BATCHES = 6, 2  # 12 steps; the interrupted run stops after epoch 3 (step 6)
LR_DROPS = LRDrops(milestones=(2, 5), gammas=(1.0, 0.1))  # one drop in each half


def callbacks():
    return [
        SpriteFreeze(epochs=1),  # ends at epoch 1 (first half)
        Curriculum(sprite=[4]),  # switches the similarity on at epoch 4 (second half)
        # Every sprite counts as unused: a reassignment at steps 4, 8 and 12; 2 steps are
        # pending at the interruption.
        SpriteReassignment(every_n_steps=4, threshold=10.0),
    ]


def run(tmp_path, squares, max_epochs, ckpt_path=None, lr_drops=LR_DROPS):
    L.seed_everything(0, verbose=False)
    module = DTISpritesModule(DTISprites(**MODEL), lr=1e-2, lr_drops=lr_drops)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=BATCHES,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks(), checkpoint],
        deterministic=True,
    )
    trainer.fit(module, squares(n=8), ckpt_path=ckpt_path)
    return trainer, module


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, squares):
    full_trainer, full = run(tmp_path / "full", squares, EPOCHS)
    _, _half = run(tmp_path / "split", squares, EPOCHS // 2)
    resumed_trainer, resumed = run(tmp_path / "split", squares, EPOCHS, ckpt_path="last")
    assert resumed_trainer.global_step == full_trainer.global_step == EPOCHS * BATCHES
    events = next(c for c in resumed_trainer.callbacks if isinstance(c, SpriteReassignment)).events
    assert sorted({e["step"] for e in events}) == [4, 8, 12]  # restored across the resume
    assert_same_training_state(full_trainer, full, resumed_trainer, resumed)


def assert_same_training_state(full_trainer, full, resumed_trainer, resumed):
    """Parameters, buffers, optimizer state and learning rates, bit for bit."""
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    full_opt = full_trainer.optimizers[0].state_dict()
    resumed_opt = resumed_trainer.optimizers[0].state_dict()
    assert [g["lr"] for g in full_opt["param_groups"]] == [
        g["lr"] for g in resumed_opt["param_groups"]
    ]
    for key, state in full_opt["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(value, resumed_opt["state"][key][field], rtol=0, atol=0)


def as_written_before_issue_21(checkpoint: dict, lr_drops: LRDrops) -> dict:
    """A checkpoint as the code before issue 21 wrote it: no LR scheduler (an LRDrops callback
    had set each group's lr from its ``initial_lr`` at the start of each epoch, or of each step
    from the steps done before it, and kept the number of drops), the freeze's state under
    ``epochs``, no event list but the reassignment's, no ``lr_drops`` hyper-parameter."""
    old = dict(checkpoint)
    # When the old callback last set the lrs: the epoch that ended, or the last step's start.
    now = old["epoch"] if lr_drops.interval == "epoch" else old["global_step"] - 1
    drops = sum(m <= now for m in lr_drops.milestones)
    old["lr_schedulers"] = []
    old["optimizer_states"] = [dict(s) for s in old["optimizer_states"]]
    for state in old["optimizer_states"]:
        state["param_groups"] = [dict(g) for g in state["param_groups"]]
        for group, gamma in zip(state["param_groups"], lr_drops.gammas, strict=True):
            group["lr"] = group["initial_lr"] * gamma**drops
    callbacks = {key: dict(value) for key, value in old["callbacks"].items()}
    freeze = callbacks.pop("SpriteFreeze")
    callbacks["SpriteFreeze"] = {"epochs": freeze["until"], "frozen": freeze["frozen"]}
    curriculum = callbacks["Curriculum"]
    callbacks["Curriculum"] = {k: curriculum[k] for k in ("milestones", "n_active")}
    callbacks["LRDrops"] = {"drops": drops}
    old["callbacks"] = callbacks
    old["hyper_parameters"] = {k: v for k, v in old["hyper_parameters"].items() if k != "lr_drops"}
    return old


@pytest.mark.parametrize(
    "lr_drops",
    [LR_DROPS, LRDrops(milestones=(5, 9), gammas=(1.0, 0.1), interval="step")],
    ids=["epochs", "steps"],
)
def test_a_checkpoint_written_before_issue_21_resumes_exactly(tmp_path, squares, lr_drops):
    full_trainer, full = run(tmp_path / "full", squares, EPOCHS, lr_drops=lr_drops)
    run(tmp_path / "split", squares, EPOCHS // 2, lr_drops=lr_drops)
    saved = torch.load(tmp_path / "split" / "ckpt" / "last.ckpt", weights_only=False)
    # Lightning's LR scheduler state: stepped at the end of each of the 3 epochs (6 steps).
    per_epoch = lr_drops.interval == "epoch"
    assert saved["lr_schedulers"][0]["last_epoch"] == (EPOCHS // 2 if per_epoch else 6)
    old = tmp_path / "old.ckpt"
    torch.save(as_written_before_issue_21(saved, lr_drops), old)
    resumed_trainer, resumed = run(
        tmp_path / "split", squares, EPOCHS, ckpt_path=old, lr_drops=lr_drops
    )
    assert resumed_trainer.global_step == full_trainer.global_step == EPOCHS * BATCHES
    (config,) = resumed_trainer.lr_scheduler_configs
    assert config.scheduler.last_epoch == (EPOCHS if per_epoch else EPOCHS * BATCHES)
    assert config.scheduler.drops == 2
    freeze = next(c for c in resumed_trainer.callbacks if isinstance(c, SpriteFreeze))
    assert freeze.frozen is False
    assert_same_training_state(full_trainer, full, resumed_trainer, resumed)


def test_a_failed_checkpoint_write_leaves_the_last_good_one(tmp_path, squares, monkeypatch):
    trainer, _module = run(tmp_path, squares, 1)
    last = tmp_path / "ckpt" / "last.ckpt"
    good = last.read_bytes()

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == good
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


class PoisonAt(L.Callback):
    """Makes the loss NaN from the given step on (by poisoning the input images)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            batch["image"][:] = float("nan")


def test_nonfinite_loss_stops_and_names_the_step_and_last_checkpoint(tmp_path, squares):
    L.seed_everything(0, verbose=False)
    module = DTISpritesModule(DTISprites(**MODEL))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        callbacks=[checkpoint, PoisonAt(3)],
    )
    with pytest.raises(FloatingPointError, match=r"global step 3 .*last\.ckpt"):
        trainer.fit(module, squares(n=8))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # the last good state, intact
    assert all(
        torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()
    )
