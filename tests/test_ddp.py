"""A real 2-process DDP run (CPU, gloo): ranks agree on everything they decide (issue 6)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_two_process_ddp_ranks_stay_identical(tmp_path):
    script = Path(__file__).parent / "ddp_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # Reassignment fired (after the frozen first epoch) and identically on both ranks.
    assert ranks[0]["events"] and ranks[0]["events"] == ranks[1]["events"]
    assert min(e["step"] for e in ranks[0]["events"]) > 6
    # Sprites, masks, backgrounds, every head, the encoder and the schedule buffers:
    # bit-identical. (BatchNorm running statistics are each rank's own, as in any DDP run;
    # DDP broadcasts rank 0's at every forward, and rank 0's are the ones checkpointed.)
    compared = 0
    for name, value in ranks[0]["state_dict"].items():
        if "running_" not in name and "num_batches_tracked" not in name:
            assert torch.equal(value, ranks[1]["state_dict"][name]), name
            compared += 1
    assert compared > 100
    # The ranks saw different data, and the logged loss is the mean of the ranks' losses.
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    assert len(local0) == len(local1) == 18 and local0 != local1
    for logged, a, b in zip(ranks[0]["logged"], local0, local1, strict=True):
        assert logged == pytest.approx((a + b) / 2, rel=1e-6)


def test_two_process_ddp_preempted_mid_epoch_resumes_exactly(tmp_path):
    """The small demo on 2 processes (gloo, 5 steps per epoch) through `dti-sprites fit`:
    SIGTERM reaches rank 0 only, during step 7 (mid-epoch, after SpriteSeeding collected the
    crops of steps 6 and 7, before its k-means at step 8). Both processes stop after that step,
    the checkpoint holds each process's own counters and random state, both exit with status 0,
    and the resumed run ends as the uninterrupted one on both ranks."""
    import signal

    from resume_helpers import (
        DDP_DEMO_SCHEDULES,
        assert_same_final_state,
        cli_args,
        preempt,
        small_config,
        subprocess_env,
    )

    from dti_sprites.datamodules import TetrominoesDataModule

    data = tmp_path / "demo.h5"
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    steps = "--trainer.max_steps=14"

    def args(name, *extra_callbacks, more=()):
        root = tmp_path / name
        final = {"class_path": "resume_helpers.Snapshot", "init_args": {"folder": str(root)}}
        config = small_config(
            "demo", tmp_path / f"{name}.yaml", DDP_DEMO_SCHEDULES, [final, *extra_callbacks]
        )
        return cli_args(config, data, root / "run", *ddp, steps, *more)

    def run(cmd_args):
        cmd = [sys.executable, "-m", "dti_sprites", *cmd_args]
        return subprocess.run(
            cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600
        )

    # The data, written once here (the two runs below start at the same time).
    TetrominoesDataModule(path=str(data), generate=48, train_size=40).prepare_data()
    ready = tmp_path / "preempted.ready"
    hold = {
        "class_path": "resume_helpers.HoldForSignal",
        "init_args": {"step": 7, "ready": str(ready)},
    }
    full = subprocess.Popen(
        [sys.executable, "-m", "dti_sprites", *args("full")],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    preempted = preempt(args("preempted", hold), ready, signal.SIGTERM)
    full_out = full.communicate(timeout=600)[0]
    assert full.returncode == 0, full_out[-4000:]
    assert preempted.returncode == 0, preempted.stdout_text[-4000:]
    assert "Preemption: got SIGTERM; checkpoint of global step 7" in preempted.stdout_text
    saved = torch.load(
        tmp_path / "preempted" / "run" / "checkpoints" / "last.ckpt", weights_only=False
    )
    assert (saved["global_step"], saved["epoch"]) == (7, 1)
    layer_reset = next(v for k, v in saved["callbacks"].items() if k.startswith("LayerReset"))
    mass = layer_reset["mass"]["per_rank"]  # 3 steps since the check at step 4, per process
    assert len(mass) == 2 and not torch.equal(mass[0], mass[1])
    assert len(saved["rng_state"]["per_rank"]) == 2

    resumed = run(args("preempted", hold, more=["--ckpt_path=last"]))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        final = assert_same_final_state(tmp_path / "full", tmp_path / "preempted", rank)
        # Lightning counts the epoch cut at max_steps as ended (epochs 0-1 and 2 begun).
        assert (final["epoch"], final["global_step"]) == (3, 14)
    events = final["callbacks"]["SpriteSeeding"]["events"]
    assert [e["step"] for e in events] == [8, 12]
