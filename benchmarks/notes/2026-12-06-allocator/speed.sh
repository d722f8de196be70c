#!/usr/bin/env bash
# Side by side, idle machine: ours (freed memory kept, the new default) / ours with the C
# library's defaults / the authors' step, in the same processes.
set -x
export OMP_NUM_THREADS=2
A=/tmp/authors
python benchmarks/train_step.py --config tetrominoes multidsprites --steps 10 --warmup 3 --threads 2 --authors-src $A
python benchmarks/train_step.py --config tetrominoes multidsprites --steps 10 --warmup 3 --threads 2 --authors-src $A --malloc-defaults
PYTHONPATH=/tmp/kornia_site python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 1 --threads 2 --authors-src $A
PYTHONPATH=/tmp/kornia_site python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 1 --threads 2 --authors-src $A --malloc-defaults
python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 2 --threads 2 --select-downscale 2
python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 3 --threads 2 --select-downscale 2 --compile
python benchmarks/train_step.py --config tetrominoes multidsprites --steps 10 --warmup 3 --threads 2 --compile
python benchmarks/profile_step.py --config tetrominoes multidsprites clevr6 --steps 3 --threads 2
# speed_clevr6.log: CLEVR6 side by side again (the authors' 'mean' background init needs a dataset: constant)
PYTHONPATH=/tmp/kornia_site python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 1 --threads 2 --authors-src $A
PYTHONPATH=/tmp/kornia_site python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 1 --threads 2 --authors-src $A --malloc-defaults
# one process: CLEVR6 with the coarse selection against the authors step, the same allocator (speed_clevr6_coarse.log)
PYTHONPATH=/tmp/kornia_site python benchmarks/train_step.py --config clevr6 --steps 3 --warmup 2 --threads 2 --select-downscale 2 --authors-src $A
