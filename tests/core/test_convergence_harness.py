"""benchmarks/convergence.py's Recorder: a CSV row per protocol and a checkpoint after every
validation of a fit, so a run stopped early keeps its last evaluated model."""

import csv
import importlib.util
from pathlib import Path

import lightning as L
import torch
from small_model import SMALL_MODEL

from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "convergence.py"
spec = importlib.util.spec_from_file_location("convergence", SCRIPT)
convergence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convergence)


class CheckpointSpy(L.Callback):
    """The step stored in the Recorder's checkpoint right after each validation."""

    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            self.steps.append(state["global_step"])


def test_every_validation_of_a_fit_writes_rows_and_a_checkpoint(tmp_path, squares):
    torch.manual_seed(0)
    module = DTISpritesModule(DTISprites(**{**SMALL_MODEL, "greedy_passes": 1}))
    ckpt = tmp_path / "seed0.ckpt"
    recorder, spy = convergence.Recorder(tmp_path / "seed0.csv", ckpt), CheckpointSpy(ckpt)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,  # 8 scenes, batch 4: validations after steps 2 and 4
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[recorder, spy],
    )
    trainer.fit(module, squares(n=8))
    assert spy.steps == [2, 4]  # saved inside fit, not only at its end
    assert not list(tmp_path.glob("*.tmp"))
    with (tmp_path / "seed0.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["protocol"]) for r in rows] == [
        ("2", "paper320"),
        ("2", "heldout"),
        ("4", "paper320"),
        ("4", "heldout"),
    ]
    trainer.validate(module, squares(n=8))  # a validate() after fit: rows, no new checkpoint
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4


def test_a_resumed_run_keeps_its_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "seed0.csv"
    rows = [(2, "heldout"), (4, "heldout"), (6, "heldout"), (4, "test")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, convergence.FIELDS)
        writer.writeheader()
        writer.writerows({"step": s, "protocol": p, "ari_fg": 50.0} for s, p in rows)
    convergence.Recorder(path, keep_until=4)
    with path.open() as f:
        kept = [(int(r["step"]), r["protocol"]) for r in csv.DictReader(f)]
    assert kept == [(2, "heldout"), (4, "heldout")]  # later rows and the old test rows go
