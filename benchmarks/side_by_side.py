"""Train our model or the authors' public code on the same data and score both the same way.

    python benchmarks/side_by_side.py --impl ours --config multidsprites --data FILE.h5 \
        --steps 500 --eval-at 100 250 500 --seed 0 [--encoder-updates N] [--threads 1]
    python benchmarks/side_by_side.py --impl authors --authors-src PATH/dti-sprites \
        --config multidsprites --data FILE.h5 --steps 500 --eval-at 100 250 500 --seed 0

The first phase of the paper's multi-object training as both codes run it: sprites frozen (the
empty sprite no candidate, λ off), sprite transformations not yet switched on, Adam at the
config's lr with weight decay on the networks, batch 32 drawn without replacement from the first
``--train-size`` images of ``--data`` (an HDF5 file of ``dti-sprites-data``). At each step of
``--eval-at`` both are scored by this project's metrics on the ``--eval-size`` images that follow
the training range: ARI on all pixels (instance labels, 0 = background) and ARI-FG (background
pixels given to the best-coloured layer). Prints one JSON line per evaluation.

``ours`` builds the model, optimizer and schedule from ``experiments/<config>.yaml`` as
``dti-sprites fit`` does (:func:`dti_sprites.cli.build`; ``--encoder-updates`` overrides the
config's ``encoder_updates_per_step``). ``authors`` imports
the model of a checkout of the authors' repository (github.com/monniert/dti-sprites, not part of
this project) and its config (``configs/dsprites.yml`` or ``configs/clevr6.yml``), and builds the
optimizer as its trainer does: Adam over ``cluster_parameters()`` and
``transformer_parameters()`` (weight decay on the latter), in which the shared encoder appears
once per module that holds it. Two shims let that 2021 code run on current libraries:
``scipy.signal.gaussian`` (moved to ``scipy.signal.windows``) and their ``kornia`` import: today's
``kornia.geometry.transform.homography_warp`` where kornia is installed (only CLEVR6's projective
sprites call it; e.g. ``pip install --no-deps --target DIR kornia kornia_rs`` and
``PYTHONPATH=DIR``), otherwise a placeholder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import h5py
import torch
import yaml

from dti_sprites.callbacks import Curriculum, SpriteFreeze
from dti_sprites.cli import build
from dti_sprites.metrics import ARI

AUTHORS_CONFIG = {
    "multidsprites": "dsprites.yml",
    "clevr6": "clevr6.yml",
    "tetrominoes": "tetro.yml",
}


class Ours:
    """Our model, optimizer and schedule at epoch 0, from ``experiments/<config>.yaml``."""

    def __init__(self, config: str, encoder_updates: int | None, seed: int) -> None:
        overrides = [f"--seed_everything={seed}", "--trainer.logger=false"]
        if encoder_updates is not None:
            overrides.append(f"--model.encoder_updates_per_step={encoder_updates}")
        experiment = build(config, overrides, trainer=False)
        self.module = experiment.model
        self.model = self.module.model
        self.optimizer = self.module.make_optimizer()  # no trainer: no LR drops (first steps)
        holder = SimpleNamespace(model=self.model)
        for cls in (Curriculum, SpriteFreeze):  # the config's, or the defaults
            mine = [c for c in experiment.callbacks if isinstance(c, cls)] or [cls()]
            mine[0].apply(holder, 0)  # epoch 0 (the curriculum: step 0 too)

    def train_step(self, x: torch.Tensor) -> float:
        self.model.train()
        mse = self.module.objective(self.model(x))["mse"]
        self.optimizer.zero_grad(set_to_none=True)
        mse.backward()
        self.module.on_before_optimizer_step(self.optimizer)  # frozen sprites: no update
        self.optimizer.step()
        return float(mse.detach())

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance labels (B, H, W) for ARI and for ARI-FG."""
        self.model.eval()
        out = self.model(x)
        return out.instance(), out.instance_fg(x)


class Authors:
    """The authors' model and optimizer at epoch 0, from a checkout of their repository."""

    def __init__(
        self, src: Path, config: str, image_size: int, model_overrides: dict | None = None
    ) -> None:
        import scipy.signal
        import scipy.signal.windows

        scipy.signal.gaussian = scipy.signal.windows.gaussian  # moved in scipy 1.13
        try:  # their projective sprites (CLEVR6) warp with kornia's homography_warp
            import kornia
            from kornia.geometry.transform import homography_warp

            kornia.homography_warp = homography_warp  # imported from the top level in 2021
        except ImportError:  # kornia is no dependency: the other configs never call it
            sys.modules.setdefault("kornia", types.SimpleNamespace(homography_warp=None))
        sys.path.insert(0, str(src / "src"))
        from model.dti_sprites import DTISprites as AuthorsDTISprites  # type: ignore

        cfg = yaml.safe_load((src / "configs" / AUTHORS_CONFIG[config]).read_text())
        kwargs = dict(cfg["model"]) | (model_overrides or {})
        kwargs.pop("name")
        dataset = SimpleNamespace(img_size=(image_size, image_size), n_channels=3)
        self.model = AuthorsDTISprites(dataset, **kwargs)
        opt = dict(cfg["training"]["optimizer"])
        opt.pop("name")
        cluster_kwargs, tsf_kwargs = opt.pop("cluster", {}), opt.pop("transformer", {})
        self.optimizer = torch.optim.Adam(
            [
                dict(params=self.model.cluster_parameters(), **cluster_kwargs),
                dict(params=self.model.transformer_parameters(), **tsf_kwargs),
            ],
            **opt,
        )
        self.model.set_optimizer(self.optimizer)
        group = self.optimizer.param_groups[1]["params"]
        encoder = {id(p) for p in self.model.encoder.parameters()}
        first = next(iter(self.model.encoder.parameters()))
        self.encoder_listings = sum(p is first for p in group)
        print(f"authors: the encoder is listed {self.encoder_listings} times in Adam", flush=True)
        assert all(
            sum(q is p for q in group) == self.encoder_listings for p in group if id(p) in encoder
        )

    def train_step(self, x: torch.Tensor) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        loss, _ = self.model(x)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        instance = self.model.transform(x, pred_instance_labels=True, with_bkg=True)
        instance_fg = self.model.transform(x, pred_instance_labels=True, with_bkg=False)
        return instance, instance_fg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["ours", "authors"], required=True)
    parser.add_argument("--config", default="multidsprites", choices=sorted(AUTHORS_CONFIG))
    parser.add_argument("--data", required=True, help="HDF5 file of dti-sprites-data")
    parser.add_argument("--authors-src", type=Path, help="checkout of the authors' repository")
    parser.add_argument("--encoder-updates", type=int, default=None)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[100, 250, 500])
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--eval-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with h5py.File(args.data) as f:
        n = args.train_size + args.eval_size
        images = torch.from_numpy(f["image"][:n]).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        masks = torch.from_numpy(f["mask"][:n]).long()  # (N, H, W)
    if len(images) < n:
        raise SystemExit(f"{args.data}: {len(images)} images, need {n} (train + eval)")
    eval_x = images[args.train_size :].float() / 255
    eval_mask = masks[args.train_size :]
    if args.impl == "ours":
        runner: Ours | Authors = Ours(args.config, args.encoder_updates, args.seed)
    else:
        if args.authors_src is None:
            raise SystemExit("--impl authors needs --authors-src")
        runner = Authors(args.authors_src, args.config, images.shape[-1])
    name = args.name or args.impl
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(args.train_size, generator=generator)
    start, position, losses = time.perf_counter(), 0, []
    for step in range(1, args.steps + 1):
        if position + args.batch > args.train_size:  # a new epoch
            order, position = torch.randperm(args.train_size, generator=generator), 0
        x = images[order[position : position + args.batch]].float() / 255
        position += args.batch
        losses.append(runner.train_step(x))
        if step in args.eval_at:
            ari, ari_fg = ARI(foreground_only=False), ARI(foreground_only=True)
            for i in range(0, len(eval_x), 64):
                instance, instance_fg = runner.labels(eval_x[i : i + 64])
                ari.update(instance, eval_mask[i : i + 64])
                ari_fg.update(instance_fg, eval_mask[i : i + 64])
            row = {
                "name": name,
                "impl": args.impl,
                "seed": args.seed,
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
                "ari": round(100 * float(ari.compute()), 1),
                "ari_fg": round(100 * float(ari_fg.compute()), 1),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
