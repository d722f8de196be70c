"""Where a training step goes, per phase (torch.profiler), for the paper's configurations.

    python benchmarks/profile_step.py --config tetrominoes multidsprites clevr6 [--steps 3]
        [--threads 2] [--batch B] [--precision bf16] [--select-downscale F]

The step is :mod:`train_step`'s (every curriculum stage on, sprites unfrozen, mask noise on,
the config's Adam). The model's phases are labelled from outside (its methods wrapped in
``torch.profiler.record_function``, nothing in the model changes):

- ``encoder``: the CNN forward; ``heads``: the transformation and occlusion heads;
- ``select``: the selection without gradients, of which ``select/render`` renders every
  candidate and ``select/greedy`` scores them (greedy coordinate descent);
- ``render``: the selected sprites and background, with gradients; ``compose``: the layered
  composition of the reconstruction;
- ``backward`` and ``optimizer`` (Adam, with the config's repeated encoder updates).

Freed memory is kept in the process for reuse, as in training (:mod:`dti_sprites.allocator`);
``--malloc-defaults`` leaves the C library's defaults.

Prints one markdown table per config: milliseconds per step and share of the step, CPU time of
the labelled ranges (on a GPU: the CPU-side time; use ``train_step.py`` for wall time).
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from train_step import build_module

import dti_sprites.model as model_module
from dti_sprites.allocator import keep_freed_memory

PHASES = ["encoder", "heads", "select", "select/render", "select/greedy", "render", "compose"]


def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def instrument(model: torch.nn.Module) -> None:
    """Label the phases of ``model``'s forward (instance attributes and module functions)."""
    model.encoder.forward = labelled("encoder", model.encoder.forward)
    for name in ("layer_transforms", "sprite_transforms", "background_transforms"):
        sequence = getattr(model, name)
        sequence.predict = labelled("heads", sequence.predict)
    model.occlusion.forward = labelled("heads", model.occlusion.forward)
    render = model._render
    model._select = labelled("select", model._select)

    def render_labelled(*args, **kwargs):
        label = "select/render" if torch.is_grad_enabled() is False else "render"
        with record_function(label):
            return render(*args, **kwargs)

    model._render = render_labelled
    model._render_backgrounds = labelled("render", model._render_backgrounds)
    model._greedy = labelled("select/greedy", model._greedy)  # bound at construction
    model_module.exhaustive_select = labelled("select/greedy", model_module.exhaustive_select)
    model_module.compose = labelled("compose", model_module.compose)


def profile_config(
    config: str, steps: int, batch: int | None, precision: str, device, select_downscale: int = 1
) -> None:
    module, default_batch = build_module(config, device, select_downscale=select_downscale)
    batch = batch or default_batch
    model = module.model
    instrument(model)
    images = torch.rand(batch, 3, model.image_size, model.image_size, device=device)
    optimizer = module.make_optimizer()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with record_function("step"):
            with record_function("forward"), autocast:
                loss = model(images).mse.float().mean()
            optimizer.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    totals = {e.key: e.cpu_time_total / 1000 / steps for e in prof.key_averages()}  # ms
    total = totals["step"]
    coarse = f", select_downscale {select_downscale}" if select_downscale != 1 else ""
    threads = torch.get_num_threads()
    print(f"\n{config} (batch {batch}, {precision}, {threads} threads, {device}{coarse})\n")
    print("| phase | ms per step | share of the step |")
    print("|---|---|---|")
    for phase in ["forward", *PHASES, "backward", "optimizer"]:
        ms = totals.get(phase, 0.0)
        indent = "  " if phase in PHASES else ""
        print(f"| {indent}{phase} | {ms:.0f} | {100 * ms / total:.0f}% |")
    print(f"| step | {total:.0f} | 100% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["tetrominoes", "multidsprites", "clevr6"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--select-downscale", type=int, default=1, help="the model's select_downscale switch"
    )
    parser.add_argument(
        "--malloc-defaults", action="store_true", help="do not keep freed memory (see above)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.malloc_defaults:
        keep_freed_memory()
    for config in args.config:
        device = torch.device(args.device)
        profile_config(
            config, args.steps, args.batch, args.precision, device, args.select_downscale
        )


if __name__ == "__main__":
    main()
