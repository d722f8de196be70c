"""How far the demo model gets in a fixed wall-clock budget: a probe for tuning the demo.

    python benchmarks/learning_probe.py --name NAME [--seconds 420] [--threads 1] [--lr 1e-3]
        [--prototype-lr 1e-2] [--prototype-lr-after 0] [--freeze 0] [--batch 32]
        [--model '{"encoder": "resnet8"}']

Trains ``experiments/demo.yaml``'s model on ``data/demo/tetrominoes.h5`` (run the demo once to
create it) with a plain loop — random batches of ``--batch`` (32), Adam with the module's two
parameter groups, reassignment every 50 steps through :class:`SpriteReassignment` — until
``--seconds`` have passed, then prints one JSON line (steps, seconds, ARI-FG on the first 500
held-out scenes) and writes ``<out>/<name>_sprites.png`` and ``<out>/<name>_decompositions.png``
(labelled, 4× zoom).
Two probes with ``--threads 1`` side by side use a 2-core machine better than one with 2.
``--prototype-lr`` applies from step ``--prototype-lr-after`` (before it, ``--lr``);
``--freeze N`` freezes the sprites for the first N steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import torch
import yaml

from dti_sprites.callbacks import SpriteReassignment
from dti_sprites.metrics import ari_per_image
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule
from dti_sprites.viz import decomposition_figure, save_figure, sprite_figure

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--seconds", type=float, default=420)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prototype-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--prototype-lr-after", type=int, default=0)
    parser.add_argument("--freeze", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="{}", help="JSON overrides of the model arguments")
    parser.add_argument("--data", default=str(ROOT / "data" / "demo" / "tetrominoes.h5"))
    parser.add_argument("--out", default="probes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with h5py.File(args.data) as f:
        images = torch.from_numpy(f["image"][:]).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        masks = torch.from_numpy(f["mask"][:]).long()  # (N, H, W)
    spec = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    train_size = spec["data"]["init_args"]["train_size"]  # held-out scenes follow it
    model = DTISprites(**{**spec["model"]["model"]["init_args"], **json.loads(args.model)})
    module = DTISpritesModule(model, lr=args.lr)
    optimizer = torch.optim.Adam(module.parameter_groups())
    reassignment = SpriteReassignment(every_n_steps=50)
    counts = torch.zeros(model.sprites.n_sprites)
    generator = torch.Generator().manual_seed(args.seed)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        model.freeze_sprites(step < args.freeze)
        late = args.prototype_lr and step >= args.prototype_lr_after
        optimizer.param_groups[0]["lr"] = args.prototype_lr if late else args.lr
        x = images[torch.randint(0, train_size, (args.batch,), generator=generator)].float() / 255
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        module.objective(out)["mse"].backward()
        module.on_before_optimizer_step(optimizer)  # frozen sprites get no update
        optimizer.step()
        choice = out.sprite_choice.flatten()
        counts += torch.bincount(choice[choice >= 0], minlength=len(counts))
        step += 1
        if step % reassignment.every_n_steps == 0 and step > args.freeze:
            reassignment.reassign(SimpleNamespace(model=model), optimizer, counts, step)
            counts.zero_()
    seconds = time.perf_counter() - start

    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(train_size, train_size + 500, 100):
            x = images[i : i + 100].float() / 255
            scores.append(ari_per_image(model(x).instance_fg(x), masks[i : i + 100], True))
        score = torch.cat(scores)
        out_dir = Path(args.out)
        save_figure(sprite_figure(model, zoom=4), out_dir / f"{args.name}_sprites.png")
        held_out = images[train_size : train_size + 8].float() / 255
        figure = decomposition_figure(model, held_out, zoom=4)
        save_figure(figure, out_dir / f"{args.name}_decompositions.png")
    result = {
        "name": args.name,
        "steps": step,
        "seconds": round(seconds),
        "ari_fg": round(100 * float(score[~score.isnan()].mean()), 1),
        "args": vars(args),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
