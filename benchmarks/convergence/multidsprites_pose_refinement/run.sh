#!/bin/bash
# Pose refinement (50 Adam steps, lr 0.02, 3 rounds, order search, residual placement 0.05) on the 5,000-step checkpoints:
# validation 20000-20499, then the test range 20500-20999 once.
# (the probe's spelling since commit "One spelling for the refinement options"; run as
# --refine 50 0.02 --refine-rounds 3 --order-search --residual-placement 0.05)
R="--pose-refinement 50 --pose-refinement-lr 0.02 --pose-refinement-rounds 3 --order-search --residual-placement 0.05"
for run in o12 hfk; do for seed in 0 1; do
  for range in "val 20000" "test 20500"; do
    set -- $range
    out=scratch/refine_final/${run}_${1}_seed$seed
    echo "== $run seed $seed $1"
    python benchmarks/decomposition_probe.py --checkpoint scratch/${run}_5000_seed$seed.ckpt --data data/convergence/mds21k.h5 --first $2 --count 500 --threads 2 --batch-size 50 $R --out $out 2>&1 | grep -E "ARI-FG|mIoU|mACC|found \(|merged|sprite purity:|covering"
  done
done; done
