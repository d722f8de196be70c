"""``dti-sprites-sweep k``: the final training loss against the number of sprites K
(docs/method.md §10).

    dti-sprites-sweep k --config experiments/tetrominoes.yaml --k 10 15 19 25 30
        [--out DIR] [--window N] [any `dti-sprites fit` override, e.g. --trainer.max_steps=5000]

For each K, one ``dti-sprites fit`` runs in this process (:func:`dti_sprites.cli.build`, then
``fit``) with a copy of the config whose outputs go to ``DIR/k<K>``
(``DIR/k<K>/sweep_config.yaml``: loggers' ``save_dir``, the W&B run name ``<config>-k<K>``,
ModelCheckpoint's ``dirpath``; see :func:`run_config`), then the extra overrides (passed
through unchanged; use the ``--key=value`` form), then ``--model.model.init_args.n_sprites=K``
and ``--trainer.default_root_dir=DIR/k<K>`` (:func:`fit_overrides`). A
:class:`FinalTrainingLoss` callback appended to the run records the final training loss: the
mean reconstruction MSE (the training loss) over the last ``--window`` training steps, averaged
over DDP ranks, in ``DIR/k<K>/final_loss.json``.

Outputs in DIR (default ``runs/k_sweep/<config name>``): ``k_sweep.csv`` (k, final_loss, steps,
distance, elbow; rewritten after every K, so a stopped sweep keeps what it finished) and
``k_sweep.png``, the loss against K (matplotlib), the elbow marked in red.

Elbow rule (:func:`elbow`): the largest distance below the chord. Both axes are scaled to
[0, 1] (K by its range, the loss by its range), the chord joins the first and the last point,
and the elbow is the interior point farthest below it — the maximum of Kneedle's difference
curve for a decreasing convex curve (Satopää et al., 2011) without its smoothing and threshold.
No elbow (``None``) for fewer than 3 points, a constant loss, or no point below the chord (a
straight or concave curve). The paper finds it at the true number of shapes (19 on
Tetrominoes).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from jsonargparse.typing import PositiveInt

from dti_sprites.io import atomic_write
from dti_sprites.viz import save_figure, sweep_figure

__all__ = [
    "FinalTrainingLoss",
    "chord_distances",
    "elbow",
    "main",
    "run_config",
    "write_csv",
]

PROG = "dti-sprites-sweep"
CSV_COLUMNS = ("k", "final_loss", "steps", "distance", "elbow")


# ---------------------------------------------------------------------------------- recording
class FinalTrainingLoss(L.Callback):
    """Writes the mean training loss of the last ``window`` steps to ``path`` (JSON) at the end
    of fit: ``{"k": K0, "final_loss": float, "steps": global step, "window": steps averaged}``.

    The mean is reduced over DDP ranks (every rank takes part); global rank 0 writes the file
    atomically.

    Args:
        path: the JSON file to write.
        window: training steps averaged.
    """

    def __init__(self, path: str, window: PositiveInt = 50) -> None:
        self.path = Path(path)
        self.window = window
        self.losses: deque[float] = deque(maxlen=window)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = sum(self.losses) / len(self.losses) if self.losses else math.nan
        value = torch.tensor(local, dtype=torch.float64, device=pl_module.device)
        mean = float(trainer.strategy.reduce(value, reduce_op="mean"))  # on every rank
        if not trainer.is_global_zero:
            return
        record = {
            "k": int(pl_module.model.sprites.n_sprites),
            "final_loss": mean,
            "steps": int(trainer.global_step),
            "window": len(self.losses),
        }
        with atomic_write(self.path) as tmp:
            tmp.write_text(json.dumps(record))


# -------------------------------------------------------------------------------- elbow rule
def chord_distances(ks: Sequence[float], losses: Sequence[float]) -> np.ndarray:
    """Distance of each point below the chord, in axes scaled to [0, 1]. (N,) float64.

    ks, losses (N,) with ks sorted increasing. Positive below the chord (first point to last
    point), negative above, 0 at the ends; all zeros when N < 3 or the loss is constant.
    """
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(x) < 3 or np.ptp(y) == 0 or np.ptp(x) == 0:
        return np.zeros(len(x))
    x = (x - x.min()) / np.ptp(x)  # (N,)
    y = (y - y.min()) / np.ptp(y)  # (N,)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    # Signed perpendicular distance, positive on the side below the chord.
    return ((x - x[0]) * dy - (y - y[0]) * dx) / math.hypot(dx, dy)


def elbow(ks: Sequence[int], losses: Sequence[float]) -> int | None:
    """The K at the elbow of the loss-vs-K curve (maximum distance below the chord), or None.

    ks (N,) distinct, any order; losses (N,) finite. See the module docstring for the rule.
    """
    order = np.argsort(np.asarray(ks))
    k_sorted = np.asarray(ks)[order]
    distance = chord_distances(k_sorted, np.asarray(losses, dtype=np.float64)[order])
    if len(distance) < 3 or distance.max() <= 1e-12:
        return None
    return int(k_sorted[int(distance.argmax())])


# ----------------------------------------------------------------------------------- outputs
def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write ``k_sweep.csv`` atomically from records {k, final_loss, steps}, sorted by K.

    Adds ``distance`` (below the chord, scaled axes) and ``elbow`` (1 at the elbow, else 0);
    returns the completed rows.
    """
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    losses = [r["final_loss"] for r in rows]
    distance = chord_distances(ks, losses)
    at = elbow(ks, losses)
    full = [
        {**r, "distance": float(d), "elbow": int(r["k"] == at)}
        for r, d in zip(rows, distance, strict=True)
    ]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(full)
    return full


# ----------------------------------------------------------------------------------- command
def parser() -> argparse.ArgumentParser:
    """The command-line parser of ``dti-sprites-sweep`` (unknown ``--…`` go to the fits)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train once per value of a hyper-parameter and plot the final loss. "
        "Unrecognised --key=value options are passed to every `dti-sprites fit`.",
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="sweep", required=True)
    k = sub.add_parser(
        "k",
        help="final training loss against the number of sprites K, with its elbow",
        description="Train once per K (--model.model.init_args.n_sprites) and write "
        "k_sweep.csv and k_sweep.png with the elbow marked.",
        allow_abbrev=False,
    )
    k.add_argument("--config", type=Path, required=True, help="a LightningCLI fit config")
    k.add_argument("--k", type=int, nargs="+", required=True, help="values of K to train")
    k.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/k_sweep/<config name>)"
    )
    k.add_argument(
        "--window", type=int, default=50, help="training steps averaged into the final loss"
    )
    return p


def fit_overrides(k: int, run_folder: Path, window: int, extra: Sequence[str]) -> list[str]:
    """The ``dti-sprites fit`` overrides of one K (extra overrides first, ours last)."""
    recorder = {
        "class_path": f"{__name__}.FinalTrainingLoss",
        "init_args": {"path": str(run_folder / "final_loss.json"), "window": window},
    }
    return [
        *extra,
        f"--model.model.init_args.n_sprites={k}",
        f"--trainer.default_root_dir={run_folder}",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    ]


LOGGERS_WITH_SAVE_DIR = ("WandbLogger", "CSVLogger", "TensorBoardLogger")


def run_config(config: dict[str, Any], folder: Path, run_name: str) -> dict[str, Any]:
    """The config of one run of a sweep: a copy of ``config`` whose outputs go to ``folder``.

    Loggers (W&B, CSV, TensorBoard) save under ``folder`` and the W&B run is named
    ``run_name``; every ModelCheckpoint writes to ``folder/checkpoints``. (The fit's
    ``--trainer.default_root_dir=folder`` alone does this for the experiment configs; a config
    that fixes a folder itself would otherwise make every K share it.)
    """
    config = copy.deepcopy(config)
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith(
            LOGGERS_WITH_SAVE_DIR
        ):
            init_args = entry.setdefault("init_args", {}) or {}
            entry["init_args"] = init_args
            init_args["save_dir"] = str(folder)
            if entry["class_path"].endswith("WandbLogger"):
                init_args["name"] = run_name
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith(
            "ModelCheckpoint"
        ):
            init_args = callback.setdefault("init_args", {}) or {}
            callback["init_args"] = init_args
            init_args["dirpath"] = str(folder / "checkpoints")
    return config


def _finish_wandb() -> None:
    """End a W&B run left open by a fit, so the next K gets its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dti-sprites-sweep``; returns the exit status (0 = success)."""
    args, extra = parser().parse_known_args(argv)
    problem = None
    if extra and not extra[0].startswith("--"):
        problem = f"unexpected argument {extra[0]!r} (fit overrides look like --key=value)"
    elif len(set(args.k)) != len(args.k) or min(args.k) < 1:
        problem = f"--k needs distinct values >= 1, got {args.k}"
    elif args.window < 1:
        problem = f"--window must be >= 1, got {args.window}"
    elif not args.config.is_file():
        problem = f"config not found: {args.config}"
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    from dti_sprites.cli import build
    from dti_sprites.io import DataSourceError

    try:
        base = yaml.safe_load(args.config.read_text()) or {}
    except yaml.YAMLError as err:
        print(f"{PROG}: error: cannot parse {args.config}: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path("runs/k_sweep") / args.config.stem
    rows: list[dict[str, Any]] = []
    for k in args.k:
        folder = out / f"k{k}"
        result = folder / "final_loss.json"
        result.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "sweep_config.yaml"
        header = f"# {PROG}: {args.config} with outputs in {folder}; K comes from the CLI\n"
        body = yaml.safe_dump(run_config(base, folder, f"{args.config.stem}-k{k}"), sort_keys=False)
        config.write_text(header + body)
        print(f"{PROG}: K={k}: training into {folder}", flush=True)
        argv0 = sys.argv
        sys.argv = sys.argv[:1]  # the fit's arguments are ours, not this command's
        try:
            build(config, fit_overrides(k, folder, args.window, extra)).fit()
        except DataSourceError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        finally:
            sys.argv = argv0
            _finish_wandb()
        if not result.is_file():
            print(f"{PROG}: error: K={k}: the fit ended without writing {result}", file=sys.stderr)
            return 1
        record = json.loads(result.read_text())
        rows.append({"k": k, "final_loss": record["final_loss"], "steps": record["steps"]})
        write_csv(rows, out / "k_sweep.csv")
    full = write_csv(rows, out / "k_sweep.csv")
    at = next((r["k"] for r in full if r["elbow"]), None)
    save_figure(
        sweep_figure([r["k"] for r in full], [r["final_loss"] for r in full], at),
        out / "k_sweep.png",
    )
    for r in full:
        mark = "  <- elbow" if r["elbow"] else ""
        print(f"K={r['k']:>4}  final loss {r['final_loss']:.6g}{mark}")
    print(f"{PROG}: wrote {out / 'k_sweep.csv'} and {out / 'k_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
