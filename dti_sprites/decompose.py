"""``dti-sprites-decompose``: decompose any images with a trained model.

    dti-sprites-decompose --ckpt CKPT --input FILE.h5|FOLDER --out predictions.h5
        [--png DIR] [--batch-size B] [--device auto|cpu|cuda|cuda:1]
        [--pose-refinement STEPS] [--pose-refinement-rounds R] [--order-search] ...

Inputs:

- an HDF5 file with ``image`` (N, H, W, 3 or 1) uint8 at the model's image size (the files of
  ``dti-sprites-data``); images are not resized, a size mismatch is an error;
- a folder of .jpg / .jpeg / .png images (searched recursively, sorted by path); each is
  resized so its short side is the model's image size S, then centre-cropped to S × S (the
  rule of ``ImageFolderDataModule``).

``predictions.h5`` holds the datasets of ``dti-sprites predict`` (``Decomposition.to_arrays``):
``reconstruction`` (N, S, S, 3) uint8, ``instance`` (for ARI), ``instance_fg`` (for ARI-FG) and
``semantic`` (for mACC / mIoU) (N, S, S) uint8, ``layers`` (N, L, S, S, 4) uint8 RGBA,
``sprite_choice`` (N, L) int16 (−1 = empty), plus ``index`` (N,) int64 (row of the input),
``source_index`` (N,) int64 for an HDF5 input (the file's ``source_index`` if it has one, else
the row) and ``path`` (N,) str for a folder input (relative to the folder). Attributes:
``checkpoint``, ``input``, ``model_config`` (JSON), ``refinement`` (JSON: the refinement at
evaluation in force, docs/method.md §11; the model's own unless ``--pose-refinement``,
``--pose-refinement-lr``, ``--pose-refinement-rounds``, ``--order-search`` or
``--residual-placement`` override it).

With ``--png DIR``, for image i (row i of predictions.h5): ``<i>_layer<l>.png`` (RGBA of layer
l, transparent where the layer is empty), ``<i>_reconstruction.png`` and ``<i>.json``
(``index``; ``source``: the input's ``source_index`` or relative path; ``sprite_choice`` per
layer, ``null`` for the empty sprite; per layer the selected transformation parameters,
``Decomposition.params``, ``layer/*`` always and ``sprite/*`` for a non-empty layer; the
background index and its parameters).

Outputs are atomic: predictions.h5 is written under ``<out>.partial`` and renamed at the end;
the PNG and JSON files are staged in a hidden folder next to DIR and moved into DIR at the end
(existing files of the same name are replaced, others are kept); nothing is left behind when an
error stops the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dti_sprites.allocator import keep_freed_memory
from dti_sprites.datamodules.hdf5 import HDF5FormatError, MultiObjectHDF5Dataset, check_file
from dti_sprites.datamodules.image_files import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ImageRecord,
    find_images,
    load_record,
)
from dti_sprites.datamodules.pipeline.hdf5_writer import HDF5Writer
from dti_sprites.model import Decomposition, DTISprites

__all__ = ["DecomposeError", "decompose", "image_batches", "main", "png_outputs"]

PROG = "dti-sprites-decompose"


class DecomposeError(Exception):
    """A user-facing problem (missing file, wrong size, unreadable input); names the path."""


# ------------------------------------------------------------------------------------- inputs
def load_model(ckpt: Path, device: torch.device) -> DTISprites:
    """The trained model of a ``dti-sprites fit`` checkpoint, in eval mode on ``device``."""
    if not ckpt.is_file():
        raise DecomposeError(f"checkpoint not found: {ckpt}")
    try:
        model = DTISprites.from_checkpoint(ckpt, map_location="cpu")
    except ValueError as err:
        raise DecomposeError(str(err)) from err
    except Exception as err:  # unpickling / zip / key errors of a damaged or foreign file
        raise DecomposeError(f"cannot read checkpoint {ckpt}: {err}") from err
    return model.to(device).eval()


def _hdf5_batches(path: Path, size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    try:
        shapes = check_file(path, optional=("source_index",), channels=(3, 1))
    except HDF5FormatError as err:
        raise DecomposeError(str(err)) from err
    shape, keys = shapes["image"], tuple(shapes)[1:]  # (N, H, W, C); ("source_index",) or ()
    if shape[1:3] != (size, size):
        raise DecomposeError(
            f"{path}: images are {shape[1]}×{shape[2]} but the model was trained on "
            f"{size}×{size}. Note: HDF5 inputs are used as they are; convert the data at "
            f"{size}×{size}, or pass a folder of images (resized and centre-cropped to the "
            "model's size)."
        )
    records = MultiObjectHDF5Dataset(path, 0, shape[0], keys)
    try:
        for start in range(0, shape[0], batch_size):
            rows = np.arange(start, min(start + batch_size, shape[0]), dtype=np.int64)
            batch = records.rows(rows)
            image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)  # (B, C, H, W)
            source = batch["source_index"].astype(np.int64) if keys else rows
            yield {"image": image.expand(-1, 3, -1, -1), "index": rows, "source_index": source}
    finally:
        records.close()


def _folder_batches(folder: Path, size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    files = find_images(folder, recursive=True)
    if not files:
        raise DecomposeError(f"no {'/'.join(IMAGE_EXTENSIONS)} image under {folder}")
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        try:
            image = torch.stack(
                [load_record(ImageRecord(p), size, "crop")[0] for p in chunk]
            )  # (B, 3, S, S) uint8
        except ImageReadError as err:
            raise DecomposeError(str(err)) from err
        rows = np.arange(start, start + len(chunk), dtype=np.int64)
        paths = np.array([str(p.relative_to(folder)) for p in chunk], dtype=object)
        yield {"image": image, "index": rows, "path": paths}


def image_batches(source: Path, size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of an HDF5 file or an image folder, in order.

    Each batch: ``image`` (B, 3, S, S) uint8 tensor, ``index`` (B,) int64 row; plus
    ``source_index`` (B,) int64 (HDF5) or ``path`` (B,) str relative to the folder.
    """
    if source.is_dir():
        return _folder_batches(source, size, batch_size)
    if source.is_file():
        return _hdf5_batches(source, size, batch_size)
    raise DecomposeError(f"input not found: {source} (expected an HDF5 file or an image folder)")


# ------------------------------------------------------------------------------------ outputs
def _write_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def png_outputs(
    out: Decomposition,
    arrays: dict[str, np.ndarray],
    rows: np.ndarray,
    sources: np.ndarray,
    folder: Path,
) -> None:
    """Per image b of the batch: ``<i>_layer<l>.png`` (H, W, 4) RGBA, ``<i>_reconstruction.png``
    (H, W, 3) and ``<i>.json``, with i = ``rows[b]`` (its row in predictions.h5).

    ``arrays`` are ``out.to_arrays(image)``; rows (B,) int; sources (B,) the input's
    ``source_index`` or relative path, recorded in the JSON as ``source``. Files go straight
    into ``folder``.
    """
    params = {name: value.detach().cpu().double().numpy() for name, value in out.params.items()}
    choice = out.sprite_choice.cpu().tolist()  # (B, L)
    background = out.background_choice.cpu().tolist()  # (B,)
    for b, row in enumerate(rows.tolist()):
        for layer in range(arrays["layers"].shape[1]):
            _write_png(arrays["layers"][b, layer], folder / f"{row}_layer{layer}.png")
        _write_png(arrays["reconstruction"][b], folder / f"{row}_reconstruction.png")
        layers = []
        for layer, k in enumerate(choice[b]):
            entry: dict[str, Any] = {"layer": layer, "sprite": None if k < 0 else k, "params": {}}
            for name, value in params.items():  # layer/* and sprite/*: (B, L, P)
                if name.startswith("layer/") or (name.startswith("sprite/") and k >= 0):
                    entry["params"][name] = value[b, layer].tolist()
            layers.append(entry)
        source = sources[b]
        record = {
            "index": row,
            "source": source.item() if isinstance(source, np.generic) else source,
            "sprite_choice": [None if k < 0 else k for k in choice[b]],
            "layers": layers,
            "background": {
                "index": background[b],
                "params": {
                    name: value[b].tolist()
                    for name, value in params.items()
                    if name.startswith("background/")
                },
            },
        }
        (folder / f"{row}.json").write_text(json.dumps(record, indent=1))


@torch.no_grad()
def decompose(
    model: DTISprites,
    source: Path,
    out_path: Path,
    png_dir: Path | None = None,
    batch_size: int = 32,
    attrs: dict[str, Any] | None = None,
) -> int:
    """Decompose every image of ``source`` (HDF5 file or folder) into ``out_path``.

    Returns the number of images. Writes atomically (see the module docstring); on an error,
    no output appears and the error propagates.
    """
    device = next(model.parameters()).device
    size = model.image_size
    file = HDF5Writer(out_path, attrs, compression="gzip")
    staging: Path | None = None
    if png_dir is not None:
        png_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{png_dir.name}.tmp-", dir=png_dir.parent))
    try:
        for batch in image_batches(source, size, batch_size):
            image = batch["image"].to(device).float().div_(255)  # (B, 3, S, S)
            out = model(image)
            arrays = out.to_arrays(image)
            arrays["index"] = batch["index"]
            for key in ("source_index", "path"):
                if key in batch:
                    arrays[key] = batch[key]
            file.append(arrays)
            if staging is not None:
                sources = batch["path"] if "path" in batch else batch["source_index"]
                png_outputs(out, arrays, batch["index"], sources, staging)
        count = file.count
    except BaseException:
        file.close(commit=False)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if staging is not None:
        assert png_dir is not None
        png_dir.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir()):
            os.replace(path, png_dir / path.name)
        staging.rmdir()
    file.close(commit=True)
    return count


# ----------------------------------------------------------------------------------- command
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DecomposeError(f"--device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DecomposeError(f"--device {name}: CUDA is not available on this machine")
    return device


def parser() -> argparse.ArgumentParser:
    """The command-line parser of ``dti-sprites-decompose``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Decompose images (an HDF5 file or a folder) with a trained DTI-Sprites "
        "model into predictions.h5, and optionally per-layer PNGs with a JSON of the chosen "
        "sprites and transformation parameters.",
    )
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint of `dti-sprites fit`")
    p.add_argument("--input", type=Path, required=True, help="HDF5 file or image folder")
    p.add_argument("--out", type=Path, required=True, help="predictions .h5 file to write")
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write per-layer RGBA PNGs, reconstructions and JSONs here",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    add_refinement_arguments(p)
    return p


def add_refinement_arguments(parser: argparse.ArgumentParser) -> None:
    """The refinement-at-evaluation options, named after ``DTISprites``' init arguments
    (``--pose-refinement STEPS``, ``--pose-refinement-lr``, ``--pose-refinement-rounds``,
    ``--order-search`` / ``--no-order-search``, ``--residual-placement``); each left out keeps
    the model's own setting (:func:`apply_refinement`). Shared by ``dti-sprites-decompose`` and
    the benchmarks that score checkpoints."""
    refine = parser.add_argument_group(
        "refinement at evaluation (docs/method.md §11; default: the model's config)"
    )
    refine.add_argument(
        "--pose-refinement",
        type=int,
        metavar="STEPS",
        help="Adam steps fitting each image's chosen poses and colours to it (0: off)",
    )
    refine.add_argument("--pose-refinement-lr", type=float, metavar="LR")
    refine.add_argument(
        "--pose-refinement-rounds", type=int, metavar="R", help="select and refine R times"
    )
    refine.add_argument(
        "--order-search",
        action=argparse.BooleanOptionalAction,
        help="give each pair of layers the occlusion order that explains the image",
    )
    refine.add_argument(
        "--residual-placement",
        type=float,
        metavar="T",
        help="move empty layers onto residual peaks above T before each new selection",
    )


def apply_refinement(model: DTISprites, args: argparse.Namespace) -> dict[str, float | int | bool]:
    """Apply the options of :func:`add_refinement_arguments` over the model's own settings
    (each given option overrides its own; ValueError for a bad value) and return the settings
    in force, by init argument name (``predictions.h5`` records them)."""
    settings = model.refinement_settings()
    settings.update({n: getattr(args, n) for n in settings if getattr(args, n) is not None})
    model.set_pose_refinement(*settings.values())
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dti-sprites-decompose``; returns the exit status (0 = success)."""
    args = parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise DecomposeError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = _device(args.device)
        keep_freed_memory()  # this process's large temporaries reuse freed memory
        model = load_model(args.ckpt, device)
        try:
            refinement = apply_refinement(model, args)
        except ValueError as err:
            raise DecomposeError(f"refinement options: {err}") from err
        attrs = {
            "checkpoint": str(args.ckpt),
            "input": str(args.input),
            "model_config": json.dumps(model.config),
            "refinement": json.dumps(refinement),
        }
        n = decompose(model, args.input, args.out, args.png, args.batch_size, attrs)
    except DecomposeError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    extra = f" and {args.png}/" if args.png is not None else ""
    print(f"{PROG}: {n} images decomposed into {args.out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
