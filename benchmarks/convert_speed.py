"""Tetrominoes conversion speed: synthesise records, time ``convert`` on one core.

Usage: ``python benchmarks/convert_speed.py [--n 20000] [--repeat 3]``. Prints
``dataset=tetrominoes img_per_s=X peak_mb=Y``: X from the best wall-clock time of the repeats,
Y the peak resident memory of the process (most of it is importing torch and lightning; the
growth during conversion is printed on the comment line, with the CPU-time rate, which is what
one core sustains when the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from dti_sprites.datamodules.pipeline.convert import convert
from dti_sprites.datamodules.pipeline.synth import write_synthetic
from dti_sprites.datamodules.pipeline.tfrecord import CRC32C_BACKEND


def _one_core() -> None:
    """Pin the process to one CPU and one torch thread."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="records to synthesise")
    parser.add_argument("--repeat", type=int, default=3, help="timed conversions (best is kept)")
    args = parser.parse_args()
    _one_core()
    with tempfile.TemporaryDirectory() as root:
        src = write_synthetic("tetrominoes", Path(root) / "tetrominoes.tfrecords", args.n, seed=0)
        before = _peak_mb()
        wall = cpu = float("inf")
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            summary = convert("tetrominoes", src, Path(root) / "tetrominoes.h5", progress=False)
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
            assert summary.written == args.n
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"# {platform.machine()} {os.cpu_count()} cpus, load {load:.1f}, python "
            f"{platform.python_version()}, crc32c backend {CRC32C_BACKEND}, source "
            f"{src.stat().st_size / 1e6:.1f} MB; cpu-time img_per_s={args.n / cpu:.0f}, "
            f"conversion adds {max(_peak_mb() - before, 0):.0f} MB to the peak"
        )
        print(f"dataset=tetrominoes img_per_s={args.n / wall:.0f} peak_mb={_peak_mb():.0f}")


if __name__ == "__main__":
    main()
