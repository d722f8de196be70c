#!/usr/bin/env bash
# The GPU check: one command, at most ~10 minutes on one GPU, that measures and records.
#
#   bash benchmarks/device_check.sh           # on a GPU machine
#   bash benchmarks/device_check.sh --tiny    # a minute on a CPU: every part runs (tiny sizes, batch 2)
#
# Prints, and appends to benchmarks/RESULTS.md (or $DEVICE_CHECK_RESULTS) under a heading with
# the date and the device name:
#   1. benchmarks/train_step.py for tetrominoes, multidsprites and clevr6 at batch 32 and 128,
#      fp32 and bf16 autocast (images/s, peak GPU memory, encoder share); then with the encoder
#      compiled (torch.compile), fp32 and bf16, at batch 32 for tetrominoes and clevr6; then
#      with the selection on a coarse grid (select_downscale 2), fp32 and bf16, at batch 32 for
#      multidsprites and clevr6;
#   2. a short Tetrominoes training of the paper config and of the fast recipe through
#      benchmarks/convergence.py: held-out ARI-FG / ARI / mACC / mIoU after a fixed number of
#      steps, on generated data (no download).
# On a machine without this package's dependencies (a bare GPU machine), it installs the
# project without its dependencies, plus any wheels carried in .whl/ (jsonargparse and its
# needs, wandb), and needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
[[ "${1:-}" == "--tiny" ]] && tiny=1
results=${DEVICE_CHECK_RESULTS:-benchmarks/RESULTS.md}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline

if ! "$python" -c "import dti_sprites.cli" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps .whl/*.whl
  fi
  "$python" -m pip install -q --no-deps --no-build-isolation -e .
fi

if ((tiny)); then
  step_args=(--steps 1 --warmup 0 --same-process)  # one process start per call
  batches=(2)
  compile_batch=2
  compiled=(--config tetrominoes --encoder resnet8 --steps 1 --warmup 1)  # quick on a CPU
  train=(--steps 4 --every 2 --heldout 20 --generate 120 --data "$(mktemp -d)/tetrominoes.h5"
         -- --data.init_args.train_size=80 --data.init_args.batch_size=8)
else
  step_args=(--steps 10 --warmup 3)
  batches=(32 128)
  compile_batch=32
  compiled=(--config tetrominoes clevr6 --steps 10 --warmup 3)
  train=(--steps 2000 --every 500 --heldout 1000 --generate 62000
         --data data/device_check/tetrominoes.h5)
fi
out=$(mktemp -d)
device=$("$python" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
log="$out/device_check.md"
{
  echo
  echo "### device_check.sh on $device, $(date -u +%F)$( ((tiny)) && echo ' (--tiny)')"
  echo
  echo '```'
  for batch in "${batches[@]}"; do
    "$python" benchmarks/train_step.py --config tetrominoes multidsprites clevr6 \
      --batch "$batch" --precision 32 bf16 "${step_args[@]}" 2>&1 |
      grep -E '^(device|config)=' | sed "s/^/batch=$batch /"
  done
  "$python" benchmarks/train_step.py "${compiled[@]}" --batch "$compile_batch" \
    --precision 32 bf16 --compile 2>&1 | grep -E '^config=' | sed "s/^/batch=$compile_batch /"
  "$python" benchmarks/train_step.py --config multidsprites clevr6 --batch "$compile_batch" \
    --precision 32 bf16 --select-downscale 2 "${step_args[@]}" 2>&1 |
    grep -E '^config=' | sed "s/^/batch=$compile_batch /"
  for config in tetrominoes tetrominoes_fast; do
    "$python" benchmarks/convergence.py --config "$config" --seeds 0 --threads 4 \
      --out "$out" "${train[@]}" >"$out/$config.log" 2>&1 ||
      { tail -20 "$out/$config.log"; exit 1; }
    echo "convergence $config (seed 0, held-out):"
    grep heldout "$out/$config/seed0.csv" | cut -d, -f1,2,4-8 | sed 's/^/  step,seconds,ari_fg,ari,macc,miou,in_use = /'
  done
  echo '```'
} | tee "$log"
cat "$results" "$log" >"$results.partial" && mv "$results.partial" "$results"
echo "appended to $results"
