"""Time full training steps of the paper's configurations.

    python benchmarks/train_step.py --config tetrominoes multidsprites clevr6 [--steps N]
        [--threads T] [--batch B] [--warmup W] [--encoder resnet8] [--precision 32 bf16]
        [--compile] [--select-downscale F] [--same-process]

A step is what training does: forward (encoder, heads, rendering of every candidate, greedy
selection), rendering of the selected sprites, MSE, backward and the config's Adam (with its
repeated encoder updates) — with every curriculum
stage on, sprites unfrozen and mask noise on. The model comes from ``experiments/NAME.yaml``
(or a YAML path), built as ``dti-sprites fit`` builds it (:func:`dti_sprites.cli.build`).
Prints one line per config and precision:

    config=NAME precision=P compile=C img_per_s=X peak_mb=Y encoder_ratio=R [authors_img_per_s=A
    speedup=S]

``encoder_ratio`` is the step time over the time of the encoder's own forward + backward + Adam
updates (as many as the config's ``encoder_updates_per_step``: 7 for Multi-dSprites, 8 for
CLEVR6), measured in the same run: how much the sprite machinery costs on top of the CNN.
``--authors-src PATH`` (a checkout of github.com/monniert/dti-sprites, not part of this project)
also times the authors' step in the same process, on the same images, in the same late-training
state (every transformation active, sprites unfrozen), and adds ``authors_img_per_s`` and
``speedup`` (ours over theirs) to the line; their model and optimizer are built as
``side_by_side.py`` builds them.
``--encoder`` replaces the config's encoder (the line then says ``config=NAME/ENCODER``).
``peak_mb`` is the peak GPU memory allocated on CUDA, the peak resident memory of the process
on the CPU. Runs on the GPU when one is present (``--device cpu`` to force the CPU). Each config
runs in its own process, so that peak memory is per config; ``--same-process`` runs them all in
this one (quicker to start; peak memory is then the process's so far).
``--precision bf16`` runs forward and loss under ``torch.autocast`` in bfloat16 (what
``--trainer.precision=bf16-mixed`` does in training; parameters and Adam stay fp32).
``--compile`` sets the model's ``compile`` switch: the encoder and the greedy selection
compiled with ``torch.compile`` (the compilation happens in the warm-up steps, untimed).
Training keeps freed memory in the process for reuse (``DTISpritesModule(keep_freed_memory=True)``,
:mod:`dti_sprites.allocator`), and so does this script; ``--malloc-defaults`` leaves the C
library's defaults (the step before 2026-12-06): the line then says ``keep_freed_memory=0``.
``--select-downscale F`` sets the model's ``select_downscale`` switch: candidates rendered and
scored on an (H/F)×(W/F) grid (docs/method.md §11); the line then says ``select_downscale=F``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import torch

from dti_sprites.allocator import keep_freed_memory
from dti_sprites.cli import build
from dti_sprites.encoders import EncoderName
from dti_sprites.module import DTISpritesModule
from dti_sprites.optim import Adam


def build_module(
    config: str,
    device: torch.device,
    encoder: str | None = None,
    compile: bool = False,
    select_downscale: int = 1,
) -> tuple[DTISpritesModule, int]:
    """The config's module (seed 0) in its training state on ``device``, and its batch size."""
    overrides = ["--seed_everything=0", "--trainer.logger=false"]
    if select_downscale != 1:
        overrides.append(f"--model.model.init_args.select_downscale={select_downscale}")
    if encoder:
        overrides.append(f"--model.model.init_args.encoder={encoder}")
    if compile:
        overrides.append("--model.model.init_args.compile=true")
    experiment = build(config, overrides, trainer=False)
    module = experiment.model
    model = module.model
    for sequence in model.transform_groups().values():
        sequence.set_active(len(sequence))  # every curriculum stage on
    model.freeze_sprites(False)
    model.train()  # mask noise on
    return module.to(device), experiment.datamodule.batch_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def benchmark(
    config: str,
    steps: int,
    warmup: int,
    batch: int | None,
    device: torch.device,
    encoder: str | None = None,
    precision: str = "32",
    compile_encoder: bool = False,
    select_downscale: int = 1,
    authors_src: Path | None = None,
    malloc_kept: bool = True,
) -> None:
    module, default_batch = build_module(config, device, encoder, compile_encoder, select_downscale)
    batch = batch or default_batch
    model = module.model
    size = model.image_size
    images = torch.rand(batch, 3, size, size, device=device)
    optimizer = module.make_optimizer()  # the config's, e.g. repeated encoder updates
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(images).mse.float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    updates = int(module.hparams.get("encoder_updates_per_step", 1))  # the config's repeats
    encoder_optimizer = Adam([{"params": model.encoder.parameters(), "updates": updates}], lr=1e-4)

    def encoder_step() -> None:
        with autocast:
            loss = model.encoder(images).float().square().mean()
        encoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        encoder_optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_time = timed(step, steps, warmup, device)
    memory = peak_mb(device)
    encoder_time = timed(encoder_step, steps, warmup, device)
    name = f"{config}/{encoder}" if encoder else config
    switches = f" select_downscale={select_downscale}" if select_downscale != 1 else ""
    switches += "" if malloc_kept else " keep_freed_memory=0"
    authors = ""
    if authors_src is not None:
        authors_time = timed(authors_step(authors_src, config, images), steps, warmup, device)
        authors = (
            f" authors_img_per_s={batch / authors_time:.1f} speedup={authors_time / step_time:.2f}"
        )
    print(
        f"config={name} precision={precision} compile={int(compile_encoder)}{switches} "
        f"img_per_s={batch / step_time:.1f} peak_mb={memory:.0f} "
        f"encoder_ratio={step_time / encoder_time:.2f}{authors}",
        flush=True,
    )


def authors_step(src: Path, config: str, images: torch.Tensor):
    """One training step of the authors' model on ``images``, late in training: their
    curriculum and sprite freeze advanced past every milestone (``model.step()`` once per
    epoch, as their trainer calls it), so every transformation is active and sprites learn."""
    from side_by_side import Authors  # beside this script

    # A constant background init: their 'mean' init (CLEVR6) reads a dataset; the init does
    # not change what a step costs.
    authors = Authors(src, config, images.shape[-1], model_overrides={"bkg_init": "constant"})
    model = authors.model.to(images.device)
    for param in model.parameters():  # their masks are one (h, w) map expanded to K (stride 0):
        param.data = param.data.contiguous()  # today's Adam refuses to update such a tensor
    for _ in range(1000):  # epochs: beyond every milestone of their configs (at most 150)
        model.step()
    model.train()  # mask noise on

    def step() -> None:
        authors.optimizer.zero_grad()
        loss, _ = model(images)
        loss.backward()
        authors.optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["tetrominoes", "multidsprites", "clevr6"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--encoder", default=None, choices=get_args(EncoderName), help="default: the config's"
    )
    parser.add_argument("--precision", nargs="+", choices=["32", "bf16"], default=["32"])
    parser.add_argument("--compile", action="store_true", help="the model's compile switch")
    parser.add_argument(
        "--select-downscale", type=int, default=1, help="the model's select_downscale switch"
    )
    parser.add_argument("--same-process", action="store_true", help="every config in this one")
    parser.add_argument(
        "--malloc-defaults", action="store_true", help="do not keep freed memory (see above)"
    )
    parser.add_argument(
        "--authors-src", type=Path, default=None, help="time the authors' step too (a checkout)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_kept = not args.malloc_defaults and keep_freed_memory()
    device = torch.device(args.device)
    if len(args.config) > 1:
        print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    if len(args.config) > 1 and not args.same_process:  # peak memory per config
        for config in args.config:
            rest = [a for a in sys.argv[1:] if a not in args.config and a != "--config"]
            subprocess.run([sys.executable, __file__, "--config", config, *rest], check=True)
        return
    for config in args.config:
        for precision in args.precision:
            benchmark(
                config,
                args.steps,
                args.warmup,
                args.batch,
                device,
                args.encoder,
                precision,
                args.compile,
                args.select_downscale,
                args.authors_src,
                malloc_kept,
            )


if __name__ == "__main__":
    main()
