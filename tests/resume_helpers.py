"""Shared pieces of the resume tests (issue 19): small versions of the experiment configs (a
delta config on each, run through the CLI with both ``--config``), callbacks that record a
run's final state, hold a step until a signal arrives or crash the run, and the comparison of
two final states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from dti_sprites.callbacks import Preemption

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def small_config(
    name: str,
    out: Path,
    callbacks: dict[str, dict[str, Any]] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """``[experiments/<name>.yaml, out]``: the experiment config and a delta written to ``out``
    that changes the init_args of its callbacks and appends ``extra`` callbacks (a list in a
    later config replaces the list, so the delta holds the config's callbacks, changed).
    ``callbacks`` is keyed by class name (every callback of that class) or
    ``"<class name>#<i>"`` (the i-th of that class)."""
    base = EXPERIMENTS / f"{name}.yaml"
    entries = yaml.safe_load(base.read_text())["trainer"]["callbacks"]
    seen: dict[str, int] = {}
    for entry in entries:
        cls = entry["class_path"].rpartition(".")[2]
        i = seen[cls] = seen.get(cls, -1) + 1
        for key in (cls, f"{cls}#{i}"):
            entry.setdefault("init_args", {}).update((callbacks or {}).get(key, {}))
    delta: dict = {"trainer": {"callbacks": entries + (extra or [])}}
    if "LRDrops" in (callbacks or {}):  # the LR drops are the module's (model.lr_drops)
        lr_drops = dict(yaml.safe_load(base.read_text())["model"].get("lr_drops") or {})
        delta["model"] = {"lr_drops": {**lr_drops, **callbacks["LRDrops"]}}
    out.write_text(yaml.safe_dump(delta))
    return [base, out]


class Snapshot(L.Callback):
    """Saves this process's final state to ``<folder>/rank<r>.pt`` when training ends:
    parameters and buffers, optimizer state, epoch, global step, every callback's state, the
    random state."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callbacks = {}
        for cb in trainer.callbacks:
            state = cb.state_dict()  # on every process (per-process values are gathered)
            if state and not isinstance(cb, Snapshot):
                callbacks[type(cb).__name__] = state
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": {
                    k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
                },
                "optimizer": trainer.optimizers[0].state_dict(),
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "callbacks": callbacks,
                "rng": torch.get_rng_state(),
            },
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


class HoldForSignal(L.Callback):
    """At the end of training step ``step``, touches ``<ready>`` and waits (up to ``timeout``
    seconds) until the run's Preemption callback has noted a signal."""

    def __init__(self, step: int, ready: str, timeout: float = 120.0) -> None:
        self.step, self.ready, self.timeout = step, ready, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        Path(self.ready).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.02)


class CrashAt(L.Callback):
    """Raises :class:`Crash` at the end of training step ``step`` (before the checkpoint
    callbacks of that step): the checkpoints on disk are those of the steps before."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


class Crash(RuntimeError):
    """The simulated hard stop of :class:`CrashAt`."""


# ------------------------------------------------------------------------------- small runs
# The paper's Tetrominoes config and the demo, shrunk: 48 generated scenes (40 for training,
# batch 4: 10 steps per epoch on one process, 5 on two), the real model, every schedule moved
# into the first 30 steps.
TETROMINOES_SCHEDULES = {
    "SpriteReassignment": {"every_n_steps": 4},
    "LRDrops": {"milestones": [2]},  # epochs
    "SpriteDashboard": {"every_n_steps": 1000},
    "ModelCheckpoint#1": {"every_n_train_steps": 7},  # the periodic mid-epoch checkpoint
}
DEMO_SCHEDULES = {
    "LayerReset": {"every_n_steps": 4, "min_share": 0.9},
    "SpriteSeeding": {"at_step": 12, "collect_steps": 5, "refit_every": 6, "refit_until": 24},
    "SpriteFreeze": {"steps": 12},  # = SpriteSeeding.at_step
    "LRDrops": {"milestones": [26]},  # steps
    "SpriteReassignment": {"every_n_steps": 5},
    "SpriteDashboard": {"every_n_steps": 8, "zoom": 1},
}
DDP_DEMO_SCHEDULES = {  # 5 steps per epoch
    **DEMO_SCHEDULES,
    "SpriteSeeding": {"at_step": 8, "collect_steps": 3, "refit_every": 4, "refit_until": 12},
    "SpriteFreeze": {"steps": 8},
    "LRDrops": {"milestones": [10]},
    "SpriteReassignment": {"every_n_steps": 3},
}


def cli_args(configs: list[Path], data: Path, root: Path, *more: str) -> list[str]:
    """``fit`` arguments of a small run of ``configs`` (a base, then deltas): ``data``
    generated on first use, no logger."""
    return [
        "fit",
        *(arg for config in configs for arg in ("--config", str(config))),
        f"--data.init_args.path={data}",
        "--data.init_args.generate=48",
        "--data.init_args.train_size=40",
        "--data.init_args.heldout_size=4",
        "--data.init_args.paper_eval_size=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=1",
        *more,
    ]


def subprocess_env() -> dict[str, str]:
    """Environment of a ``dti-sprites`` subprocess: one thread, these helpers importable."""
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PL_DISABLE_FORK": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": path,
    }


def preempt(args: list[str], ready: Path, signum: signal.Signals, timeout: float = 300):
    """Run ``python -m dti_sprites <args>``, send it ``signum`` once ``ready`` exists (a
    :class:`HoldForSignal` step), and return the finished process (output in ``stdout``)."""
    cmd = [sys.executable, "-m", "dti_sprites", *args]
    process = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + timeout
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signum)
    process.stdout_text = process.communicate(timeout=timeout)[0]  # type: ignore[attr-defined]
    return process


def assert_same_final_state(folder_a: Path, folder_b: Path, rank: int = 0) -> dict[str, Any]:
    """The :class:`Snapshot` s of two runs agree: epoch, global step, parameters and buffers,
    optimizer state (within 1e-6), random state, every callback's counters and events."""
    a = torch.load(Path(folder_a) / f"rank{rank}.pt", weights_only=False)
    b = torch.load(Path(folder_b) / f"rank{rank}.pt", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(opt_b["state"][key][field], value, rtol=0, atol=1e-6)
    assert torch.equal(a["rng"], b["rng"])
    ignored = {"Timer", "ModelCheckpoint"}  # wall-clock time; the run's own file paths
    assert {k for k in a["callbacks"] if k not in ignored} == {
        k for k in b["callbacks"] if k not in ignored
    }
    for name, state in a["callbacks"].items():
        if name not in ignored:
            assert repr(state) == repr(b["callbacks"][name]), name
    return a
