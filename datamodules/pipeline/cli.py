"""``dti-sprites-data``: convert, generate and download the multi-object datasets.

Examples::

    dti-sprites-data synth --dataset tetrominoes --n 1000 --seed 0 --out tetro.tfrecords
    dti-sprites-data convert --dataset tetrominoes --src tetro.tfrecords --out data/tetrominoes.h5
    dti-sprites-data download --dataset clevr6 --root data

Expected failures (bad input, missing file, unknown variant) print one line on stderr and exit
with status 1; an interrupt exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dti_sprites.datamodules.catalog import DATASETS, VARIANTS
from dti_sprites.datamodules.pipeline.convert import convert
from dti_sprites.datamodules.pipeline.synth import write_synthetic

__all__ = ["build_parser", "main"]

_SYNTH_DATASETS = sorted({*DATASETS, *VARIANTS})  # ours and DeepMind's names
_ALL_VARIANTS = sorted({v for variants in VARIANTS.values() for v in variants if v is not None})
_PROG = "dti-sprites-data"


def _convert(args: argparse.Namespace) -> int:
    convert(args.dataset, args.src, args.out, args.variant, args.limit, progress=not args.quiet)
    return 0


def _synth(args: argparse.Namespace) -> int:
    path = write_synthetic(args.dataset, args.out, args.n, args.seed, args.variant)
    print(f"wrote {args.n} generated {args.dataset} records to {path}")
    return 0


def _download(args: argparse.Namespace) -> int:
    # imported lazily: only this command needs requests, urllib3 and filelock
    from dti_sprites.datamodules.pipeline.download import download

    if args.base_url is None:
        path = download(args.dataset, args.root, variant=args.variant, convert_after=True)
    else:
        path = download(
            args.dataset,
            args.root,
            variant=args.variant,
            base_url=args.base_url,
            convert_after=True,
        )
    print(path)
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dti-sprites-data`` (subcommands convert, synth, download)."""
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Convert, generate and download the multi-object datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    variant_help = f"dataset variant ({', '.join(_ALL_VARIANTS)}); default: the paper's"

    conv = commands.add_parser("convert", help="convert a DeepMind TFRecord file to HDF5")
    conv.add_argument("--dataset", required=True, choices=list(DATASETS))
    conv.add_argument("--variant", default=None, help=variant_help)
    conv.add_argument("--src", required=True, type=Path, help="source .tfrecords file")
    conv.add_argument("--out", required=True, type=Path, help="output .h5 file")
    conv.add_argument(
        "--limit", type=_non_negative, default=None, help="read only the first N records"
    )
    conv.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    conv.set_defaults(run=_convert)

    syn = commands.add_parser("synth", help="write generated records in the DeepMind encoding")
    syn.add_argument("--dataset", required=True, choices=_SYNTH_DATASETS)
    syn.add_argument("--variant", default=None, help=variant_help)
    syn.add_argument("--n", required=True, type=_non_negative, help="number of records")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--out", required=True, type=Path, help="output .tfrecords file (GZIP)")
    syn.set_defaults(run=_synth)

    down = commands.add_parser("download", help="download a public dataset, then convert it")
    down.add_argument("--dataset", required=True, choices=list(DATASETS))
    down.add_argument("--variant", default=None, help=variant_help)
    down.add_argument("--root", required=True, type=Path, help="data folder")
    down.add_argument("--base-url", default=None, help="mirror of the DeepMind bucket")
    down.set_defaults(run=_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dti-sprites-data`` with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # TFRecordError is a ValueError
        print(f"{_PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
