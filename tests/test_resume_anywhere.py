"""Resume anywhere (issue 19), through the CLI on the paper Tetrominoes config and the demo.

Every test compares a run that stopped and resumed with the uninterrupted run: same epoch,
same global step, parameters, buffers and optimizer state within 1e-6, same random state and
callback counters. The runs are the configs shrunk by resume_helpers (10 steps per epoch).
"""

import signal
from pathlib import Path

import pytest
import torch
from resume_helpers import (
    DEMO_SCHEDULES,
    TETROMINOES_SCHEDULES,
    assert_same_final_state,
    cli_args,
    preempt,
    small_config,
)

from dti_sprites.cli import main

STEPS = 30  # 3 epochs of 10 steps


@pytest.fixture(scope="module", autouse=True)
def one_thread_like_the_subprocesses():
    """The in-process runs use one thread, as the ``dti-sprites`` subprocesses do
    (``OMP_NUM_THREADS=1``): with another thread count the convolutions sum in another order,
    a greedy choice can flip, and a preempted subprocess would not equal the in-process run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(folder: Path) -> dict:
    return {"class_path": "resume_helpers.Snapshot", "init_args": {"folder": str(folder)}}


def fit(tmp: Path, name: str, config: str, schedules: dict, *more: str, extra=()) -> Path:
    """A small run of experiments/<config>.yaml in-process; returns its root."""
    root = tmp / name
    yaml = small_config(
        config, tmp / f"{name}.yaml", schedules, extra=[snapshot(root / "final"), *extra]
    )
    main(cli_args(yaml, tmp / f"{config}.h5", root, *more))
    return root


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def tetrominoes(tmp_path_factory):
    """The uninterrupted 30-step run of the small paper Tetrominoes config."""
    tmp = tmp_path_factory.mktemp("tetrominoes")
    root = fit(tmp, "full", "tetrominoes", TETROMINOES_SCHEDULES, f"--trainer.max_steps={STEPS}")
    return tmp, root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The uninterrupted 30-step run of the small demo, validating every 7 steps (mid-epoch)
    and keeping every checkpoint written at a validation's end."""
    tmp = tmp_path_factory.mktemp("demo")
    every_validation = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(tmp / "full" / "validations"),
            "save_top_k": -1,
            "every_n_epochs": 1,
            "save_on_train_epoch_end": False,
            "mode": "max",  # another state key than the config's ModelCheckpoint
        },
    }
    root = fit(
        tmp,
        "full",
        "demo",
        DEMO_SCHEDULES,
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=7",
        extra=[every_validation],
    )
    return tmp, root


def test_paper_tetrominoes_stopped_mid_epoch_resumes_exactly(tetrominoes):
    tmp, full = tetrominoes
    final = assert_same_final_state(full / "final", full / "final")
    assert (final["epoch"], final["global_step"]) == (3, STEPS)

    # Stopped by max_steps at step 15, in the middle of epoch 1 (after the sprite freeze),
    # then continued to step 30 with --ckpt_path=last.
    stopped = fit(tmp, "stopped", "tetrominoes", TETROMINOES_SCHEDULES, "--trainer.max_steps=15")
    saved = checkpoint(stopped / "checkpoints" / "last.ckpt")
    assert (saved["global_step"], saved["epoch"]) == (15, 1)
    fit(
        tmp,
        "stopped",
        "tetrominoes",
        TETROMINOES_SCHEDULES,
        f"--trainer.max_steps={STEPS}",
        "--ckpt_path=last",
    )
    assert_same_final_state(full / "final", stopped / "final")


def test_paper_tetrominoes_resumes_from_the_periodic_checkpoint_after_a_crash(tetrominoes):
    tmp, full = tetrominoes
    crash = {"class_path": "resume_helpers.CrashAt", "init_args": {"step": 23}}
    with pytest.raises(RuntimeError, match="crash at step 23"):
        fit(
            tmp,
            "crashed",
            "tetrominoes",
            TETROMINOES_SCHEDULES,
            f"--trainer.max_steps={STEPS}",
            extra=[crash],
        )
    last = tmp / "crashed" / "checkpoints" / "last.ckpt"
    saved = checkpoint(last)  # the periodic checkpoint of step 21, epoch 2 (after the LR drop)
    assert (saved["global_step"], saved["epoch"]) == (21, 2)
    fit(
        tmp,
        "crashed",
        "tetrominoes",
        TETROMINOES_SCHEDULES,
        f"--trainer.max_steps={STEPS}",
        "--ckpt_path=last",
    )
    assert_same_final_state(full / "final", tmp / "crashed" / "final")


def test_paper_tetrominoes_preempted_by_sigusr1_resumes_exactly(tetrominoes):
    """A real `dti-sprites fit` process gets SIGUSR1 during step 13 (mid-epoch): it writes
    last.ckpt at the end of that step and exits with status 0; resuming from it ends as the
    uninterrupted run."""
    tmp, full = tetrominoes
    root, ready = tmp / "preempted", tmp / "preempted.ready"
    hold = {
        "class_path": "resume_helpers.HoldForSignal",
        "init_args": {"step": 13, "ready": str(ready)},
    }
    yaml = small_config(
        "tetrominoes",
        tmp / "preempted.yaml",
        TETROMINOES_SCHEDULES,
        extra=[snapshot(root / "final"), hold],
    )
    args = cli_args(yaml, tmp / "tetrominoes.h5", root, f"--trainer.max_steps={STEPS}")
    process = preempt(args, ready, signal.SIGUSR1)
    assert process.returncode == 0, process.stdout_text[-3000:]
    assert "Preemption: got SIGUSR1; checkpoint of global step 13" in process.stdout_text
    assert not (root / "final").exists()  # it stopped: training did not end
    saved = checkpoint(root / "checkpoints" / "last.ckpt")
    assert (saved["global_step"], saved["epoch"]) == (13, 1)
    fit(
        tmp,
        "preempted",
        "tetrominoes",
        TETROMINOES_SCHEDULES,
        f"--trainer.max_steps={STEPS}",
        "--ckpt_path=last",
    )
    assert_same_final_state(full / "final", root / "final")


def test_demo_stopped_inside_the_seeding_schedule_resumes_exactly(demo):
    """Stopped at step 9: SpriteSeeding has collected the crops of steps 8 and 9, its k-means
    is at step 12; LayerReset, reassignment, refits (18, 24) and the LR drop (26) follow."""
    tmp, full = demo
    final = assert_same_final_state(full / "final", full / "final")
    seeding = final["callbacks"]["SpriteSeeding"]["events"]
    assert [(e["step"], e["kind"]) for e in seeding] == [(12, "seed"), (18, "refit"), (24, "refit")]
    assert final["callbacks"]["LayerReset"]["events"]  # layers were put back

    every_7 = "--trainer.val_check_interval=7"
    stopped = fit(tmp, "stopped", "demo", DEMO_SCHEDULES, "--trainer.max_steps=9", every_7)
    saved = checkpoint(stopped / "checkpoints" / "last.ckpt")
    assert (saved["global_step"], saved["epoch"]) == (9, 0)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("SpriteSeeding"))
    assert len(state["crops"]) == 2 and not state["events"]
    fit(
        tmp,
        "stopped",
        "demo",
        DEMO_SCHEDULES,
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=7",
        "--ckpt_path=last",
    )
    assert_same_final_state(full / "final", stopped / "final")


def test_demo_resumes_from_a_mid_epoch_validation_checkpoint(demo):
    """The checkpoint written at the end of the validation at step 14 (epoch 1, batch 4)."""
    tmp, full = demo
    saved = full / "validations" / "epoch=1-step=14.ckpt"
    assert (checkpoint(saved)["global_step"], checkpoint(saved)["epoch"]) == (14, 1)
    fit(
        tmp,
        "from_validation",
        "demo",
        DEMO_SCHEDULES,
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=7",
        f"--ckpt_path={saved}",
    )
    assert_same_final_state(full / "final", tmp / "from_validation" / "final")
