"""A real 2-process DDP fit on CPU (gloo), launched by tests/test_ddp.py.

    python tests/ddp_run.py OUT_DIR

The experiment is built as ``dti-sprites fit`` builds one (:func:`dti_sprites.cli.build`) from
an inline config: the shared small model, the in-memory squares of ``conftest``, the sprite
freeze and reassignment. Lightning's DDP launcher re-runs this script for rank 1. Each rank saves
its final state and, per step, its local loss and the logged (synced) loss to
OUT_DIR/rank<r>.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from small_model import SMALL_MODEL

from dti_sprites.callbacks import SpriteReassignment
from dti_sprites.cli import build


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.local, self.logged = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.local.append(float(outputs["loss"]))
        self.logged.append(float(trainer.callback_metrics["train/mse"]))

    def on_fit_end(self, trainer, pl_module):
        reassign = next(c for c in trainer.callbacks if isinstance(c, SpriteReassignment))
        torch.save(
            {
                "state_dict": pl_module.model.state_dict(),
                "local": self.local,
                "logged": self.logged,
                "events": reassign.events,
                "world_size": trainer.world_size,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def config(out: Path) -> dict:
    """48 scenes, batch 4 per process: 6 steps per epoch, 18 in all."""
    return {
        "seed_everything": 0,
        "model": {
            "model": {
                "class_path": "dti_sprites.DTISprites",
                "init_args": {**SMALL_MODEL, "empty_sprite": False, "greedy_passes": 2},
            },
            "lr": 1e-2,
        },
        "data": {
            "class_path": "conftest.SquaresDataModule",
            "init_args": {"n": 48, "batch_size": 4},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_epochs": 3,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "dti_sprites.callbacks.SpriteFreeze", "init_args": {"epochs": 1}},
                {
                    "class_path": "dti_sprites.callbacks.SpriteReassignment",
                    "init_args": {"every_n_steps": 3, "threshold": 10.0},
                },
            ],
        },
    }


def main(out: Path) -> None:
    experiment = build(config(out))
    experiment.trainer.callbacks.append(Record(out))
    experiment.fit()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
