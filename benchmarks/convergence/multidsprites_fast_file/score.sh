#!/bin/bash
# experiments/multidsprites_fast.yaml run whole from step 0 (the harness's run `cand12`, its
# per-250-step rows unrefined): both seeds' 5,000-step checkpoints scored with the file's own
# refinement at evaluation (50 Adam steps, lr 0.02, 3 rounds, order search, residual placement
# 0.05) by the decomposition probe, validation 20000-20499 first, then the test range
# 20500-20999 once. Outputs: <range>_seed<S>/ (summary.csv, objects.csv); the scores on stdout
# (kept as score_seed<S>.log).
# Usage: score.sh [SEED ...] (default: 0 1); THREADS=1 beside a training (default 2).
set -e
R="--pose-refinement 50 --pose-refinement-lr 0.02 --pose-refinement-rounds 3 --order-search --residual-placement 0.05"
D=benchmarks/convergence/multidsprites_fast_file
for seed in ${@:-0 1}; do
  for range in "val 20000" "test 20500"; do
    set -- $range
    echo "== seed $seed $1"
    python benchmarks/decomposition_probe.py --checkpoint scratch/cand12/seed$seed.ckpt \
      --data data/convergence/mds21k.h5 --first $2 --count 500 --threads ${THREADS:-2} --batch-size 50 $R \
      --out $D/${1}_seed$seed 2>&1 | grep -E "ARI-FG|mIoU|mACC|found \(|merged|sprite purity:|covering"
  done
done
