"""How fast a config learns: held-out and paper-320 scores every M steps, as CSV and a plot.

    python benchmarks/convergence.py --config tetrominoes_fast|FILE.yaml [DELTA.yaml …]
        [--steps 4000] [--every 500] [--seeds 0 1] [--threads 1] [--data FILE.h5] [--generate N]
        [--heldout 1000] [--test N] [--name NAME] [--out benchmarks/convergence] [--checkpoint]
        [--resume FOLDER]
        [-- EXTRA CLI ARGUMENTS]

Trains ``experiments/<config>.yaml`` (then any delta configs after it, e.g. the screens of
``benchmarks/convergence/demo_screens/``) as ``dti-sprites fit`` builds it
(:func:`dti_sprites.cli.build`), callbacks and all (its checkpointing, dashboard and logger are
left out), for ``--steps`` steps, validating every
``--every`` steps on both protocols. Every seed runs in its own process (in parallel, with
``--threads`` threads each: two 1-thread runs use 2 cores best) and writes
``<out>/<name>/seed<S>.csv`` with one row per validation and protocol:

    step, seconds, protocol, ari_fg, ari, macc, miou, sprites_in_use

(protocol ``heldout`` is the validation range, the ``--heldout`` records after the training
range, on which settings are chosen; with ``--test N`` a last row ``test`` scores the N records
after it, which no screen sees; ``seconds`` since the start of training, validation included;
``sprites_in_use`` counts the sprites chosen by at least 0.2/K0 of the layers since the
previous row, the reassignment's threshold), ``seed<S>_sprites.png`` (the sprite bank at the
end) and, once every seed is done, ``curves.png`` (the four scores against the step, one line
per seed and protocol).
``--checkpoint`` also saves the trained model as ``seed<S>.ckpt`` (to look at its decompositions)
after every validation and at the end, so a run stopped early keeps its last validated state:
``--resume`` from its own folder with ``--steps`` set to that step scores the test range and
draws the sprite bank (its CSV keeps the rows up to the checkpoint's step).
``--resume FOLDER`` continues every seed from ``FOLDER/seed<S>.ckpt`` (model, optimizer, callback
state and random state) up to ``--steps``: variants of a schedule branch from one shared start
and see the same batches until they differ: the shared steps run once, and the variants are
compared pair by pair.
A config whose model refines at evaluation (docs/method.md §11) and lists
``ValidationRefinement`` refines only the row at ``--steps`` and the ``test`` row; add
``-- --model.model.init_args.pose_refinement=0 --model.model.init_args.order_search=false`` for
unrefined rows throughout (on a CPU a refined Multi-dSprites row takes minutes).
``--data`` (default: the config's file) is generated with ``--generate`` scenes when missing.
Arguments after ``--`` go to the CLI, e.g. ``-- --model.lr=1e-3``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from dti_sprites.callbacks import EvalReport, SpriteDashboard
from dti_sprites.cli import Experiment, build, config_arg
from dti_sprites.viz import save_figure, sprite_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["step", "seconds", "protocol", "ari_fg", "ari", "macc", "miou", "sprites_in_use"]
SCORES = ["ari_fg", "ari", "macc", "miou"]


def save_atomically(trainer: L.Trainer, path: Path) -> None:
    """Save to a temporary name, then rename: a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp)
    tmp.replace(path)


class Recorder(L.Callback):
    """Appends a CSV row per protocol after every validation."""

    def __init__(
        self, path: Path, checkpoint: Path | None = None, keep_until: int | None = None
    ) -> None:
        self.path, self.checkpoint = path, checkpoint
        self.rename: dict[str, str] = {}  # protocol -> the name of its rows; "": no rows
        self.start = time.perf_counter()
        self.base: torch.Tensor | None = None  # the module's sprite usage at the last row
        kept: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():  # a resumed run continues its own CSV
            with path.open(newline="") as f:
                kept = [
                    r
                    for r in csv.DictReader(f)
                    if int(r["step"]) <= keep_until and r["protocol"] != "test"
                ]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        k0 = pl_module.model.sprites.n_sprites
        counts = pl_module.usage_since(self.base)[:, :-1].sum(0)  # (K0,)
        self.base = pl_module.usage.detach().clone()
        in_use = int((counts >= 0.2 / k0 * counts.sum().clamp(min=1)).sum())
        metrics = trainer.callback_metrics
        rows = []
        for protocol in pl_module.eval_protocols():
            if self.rename.get(protocol) == "":
                continue
            row: dict[str, Any] = {
                "step": trainer.global_step,
                "protocol": self.rename.get(protocol, protocol),
                "seconds": round(time.perf_counter() - self.start, 1),
                "sprites_in_use": in_use,
            }
            for score in SCORES:
                value = metrics.get(f"val/{protocol}/{score}")
                row[score] = "" if value is None else round(100 * float(value), 2)
            rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerows(rows)
        # inside fit (trainer.training is False during its validations), not the final validate()
        if self.checkpoint is not None and trainer.state.fn == TrainerFn.FITTING:
            save_atomically(trainer, self.checkpoint)
        print(
            *(
                f"{r['step']} {r['protocol']}: " + " ".join(f"{s}={r[s]}" for s in SCORES)
                for r in rows
            ),
            sep="\n",
            flush=True,
        )


def experiment(
    args: argparse.Namespace, extra: list[str], seed: int, folder: Path, trainer: bool = True
) -> Experiment:
    """The configs' model, DataModule and trainer, with the harness's settings."""
    overrides = [
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.steps}",
        "--trainer.max_epochs=-1",
        "--trainer.max_time=null",
        f"--trainer.val_check_interval={args.every}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={folder}",
        "--data.init_args.num_workers=0",
        f"--data.init_args.heldout_size={args.heldout}",
    ]
    if args.data:
        overrides.append(f"--data.init_args.path={args.data}")
    if args.generate:
        overrides.append(f"--data.init_args.generate={args.generate}")
    return build(args.config, [*overrides, *extra], trainer=trainer)


def run_seed(args: argparse.Namespace, extra: list[str], seed: int, folder: Path) -> None:
    """Train one seed in this process and write its CSV and sprite bank."""
    torch.set_num_threads(args.threads)
    run = experiment(args, extra, seed, folder)
    trainer, module = run.trainer, run.model
    skip = (ModelCheckpoint, SpriteDashboard, EvalReport)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, skip)]
    ckpt = None if args.resume is None else args.resume / f"seed{seed}.ckpt"
    keep_until = None  # resumed in its own folder: keep the CSV's rows up to the checkpoint
    if ckpt is not None and ckpt.resolve().parent == folder.resolve():
        keep_until = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    mine = folder / f"seed{seed}.ckpt" if args.checkpoint else None
    recorder = Recorder(folder / f"seed{seed}.csv", mine, keep_until)
    trainer.callbacks.append(recorder)
    trainer.fit(module, run.datamodule, ckpt_path=ckpt)
    if args.test:  # the test range: the --test records after the validation range
        recorder.rename = {"paper320": "", "heldout": "test"}
        test_data = experiment(
            args,
            [
                *extra,
                f"--data.init_args.heldout_offset={args.heldout}",
                f"--data.init_args.heldout_size={args.test}",
            ],
            seed,
            folder,
            trainer=False,
        )
        trainer.validate(module, test_data.datamodule)
    save_figure(sprite_figure(module.model, zoom=2), folder / f"seed{seed}_sprites.png")
    if mine is not None:
        save_atomically(trainer, mine)


def plot(folder: Path, seeds: list[int], title: str) -> Path:
    """curves.png: the four scores against the step, a line per seed and protocol."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharex=True)
    for seed in seeds:
        with (folder / f"seed{seed}.csv").open() as f:
            rows = list(csv.DictReader(f))
        for protocol, style in (("heldout", "-"), ("paper320", ":")):
            mine = [r for r in rows if r["protocol"] == protocol and r["ari_fg"] != ""]
            steps = [int(r["step"]) for r in mine]
            for ax, score in zip(axes, SCORES, strict=True):
                values = [float(r[score]) if r[score] else float("nan") for r in mine]
                ax.plot(steps, values, style, marker=".", label=f"seed {seed} {protocol}")
    for ax, score in zip(axes, SCORES, strict=True):
        ax.set(title=score, xlabel="step", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = folder / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", nargs="+", required=True, help="a config (name or YAML), then deltas"
    )
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None, help="default: the config's file")
    parser.add_argument("--generate", type=int, default=0, help="scenes to generate if missing")
    parser.add_argument("--heldout", type=int, default=1000, help="validation records")
    parser.add_argument("--test", type=int, default=0, help="test records after those")
    parser.add_argument("--name", default=None, help="default: the config's name")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "convergence")
    parser.add_argument(
        "--checkpoint", action="store_true", help="seed<S>.ckpt at every validation"
    )
    parser.add_argument("--resume", type=Path, default=None, help="folder of seed<S>.ckpt")
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # one worker
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    folder = args.out / (args.name or Path(config_arg(args.config[-1])).stem)
    if args.seed is not None:
        run_seed(args, extra, args.seed, folder)
        return
    experiment(args, extra, args.seeds[0], folder, trainer=False).datamodule.prepare_data()
    workers = [
        subprocess.Popen([sys.executable, __file__, "--seed", str(seed), *sys.argv[1:]])
        for seed in args.seeds
    ]
    if any(w.wait() for w in workers):
        sys.exit("convergence: a seed failed (see its output above)")
    print(f"wrote {plot(folder, args.seeds, folder.name)}")


if __name__ == "__main__":
    main()
