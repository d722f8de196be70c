"""Bit-exact check of a refactoring: a fixed-seed 100-step run of a config, compared across code.

Trains ``experiments/tetrominoes.yaml`` (or ``--config``) for ``--steps`` steps through the
``dti-sprites fit`` console script, on a small generated Tetrominoes file made with the
``dti-sprites-data synth`` and ``convert`` console scripts, with a fixed
``--seed_everything``, no logger and one thread; then saves the final parameters and buffers
(and the optimizer's per-parameter state and learning rates) to a ``.pt`` file. ``--compare``
prints the largest absolute difference per tensor of two such files and exits with status 1
unless every tensor is equal, bit for bit.

To compare two versions of the code, run it once against each (``PYTHONPATH`` pointing at a
checkout of the other version, laid out as installed: ``dti_sprites/`` holding ``callbacks/``
and ``datamodules/``; ``--repo`` that checkout, for its config)::

    python benchmarks/bit_exact.py --out /tmp/after.pt
    PYTHONPATH=/tmp/basepkg python benchmarks/bit_exact.py --repo /tmp/base --out /tmp/before.pt
    python benchmarks/bit_exact.py --compare /tmp/before.pt /tmp/after.pt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NOTE = (
    "bit_exact: issue 21 (callbacks on one schedule, one owner of the freeze, LR drops through "
    "Lightning's scheduler, the event log) gave the same parameters, buffers, optimizer state "
    "and learning rates, bit for bit, as the base commit 55ace35 after a 100-step seed-0 run of "
    "experiments/tetrominoes.yaml on 1 CPU thread, and of experiments/demo.yaml with its "
    "schedule moved into those 100 steps (freeze and seeding at 30, refits to 60, LR drop at 70)."
)


def script(name: str) -> str:
    """A console script of this environment (beside the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def train(args: argparse.Namespace) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "WANDB_MODE": "disabled",
        "PL_DISABLE_FORK": "1",
    }
    with tempfile.TemporaryDirectory(prefix="bit_exact_") as tmp:
        work = Path(tmp)
        records, data = work / "tetrominoes.tfrecords", work / "tetrominoes.h5"
        run(
            [script("dti-sprites-data"), "synth", "--dataset", "tetrominoes", "--n",
             str(args.records), "--seed", "0", "--out", str(records)],
            env,
        )  # fmt: skip
        run(
            [script("dti-sprites-data"), "convert", "--dataset", "tetrominoes", "--src",
             str(records), "--out", str(data), "--quiet"],
            env,
        )  # fmt: skip
        root = work / "run"
        run(
            [
                script("dti-sprites"),
                "fit",
                "--config",
                str(Path(args.repo) / args.config),
                f"--seed_everything={args.seed}",
                f"--trainer.max_steps={args.steps}",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false",
                "--trainer.limit_val_batches=2",
                f"--data.init_args.path={data}",
                f"--data.init_args.train_size={args.records - 40}",
                "--data.init_args.heldout_size=40",
                "--data.init_args.paper_eval_size=64",
                "--data.init_args.num_workers=0",
                *args.set,
            ],
            env,
        )
        checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == args.steps, checkpoint["global_step"]
    tensors = {f"model/{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, (optimizer) in enumerate(checkpoint["optimizer_states"]):
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                tensors[f"optimizer{i}/{index}/{key}"] = torch.as_tensor(value)
        for g, group in enumerate(optimizer["param_groups"]):
            tensors[f"optimizer{i}/group{g}/lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, args.out)
    print(f"{len(tensors)} tensors after {args.steps} steps written to {args.out}")


def compare(a_path: str, b_path: str) -> int:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    status = 0
    if a.keys() != b.keys():
        print(f"different tensors: only in {a_path}: {sorted(a.keys() - b.keys())}; "
              f"only in {b_path}: {sorted(b.keys() - a.keys())}")  # fmt: skip
        status = 1
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            print(f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            status = 1
            continue
        equal = torch.equal(x, y)
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        print(f"{name}: max abs difference {diff:.3g}{'' if equal else '  DIFFERENT'}")
        status |= not equal
    print(
        "all tensors equal, bit for bit" if status == 0 else "NOT bit-exact",
        f"({len(a.keys() & b.keys())} compared)",
    )
    if status == 0:
        print(NOTE)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where to save the final tensors (.pt)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two saved .pt files")
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose config is trained")
    parser.add_argument("--config", default="experiments/tetrominoes.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records", type=int, default=360, help="generated scenes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], help="one more `dti-sprites fit` argument"
    )
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if not args.out:
        parser.error("--out or --compare is required")
    train(args)


if __name__ == "__main__":
    main()
