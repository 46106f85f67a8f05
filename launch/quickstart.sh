#!/usr/bin/env bash
# README command 1: set up (or reuse) .venv, build the embedded default data, pretrain the tiny CPU
# config twice with the same seed -- GREATS and Regular -- and print them side by side.
#   bash launch/quickstart.sh [dotted.key=value ...]      (overrides apply to both runs)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh

root="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
for method in greats regular; do
  echo "[quickstart] training configs/tiny-cpu.yaml with selection.method=$method into $root/$method"
  python launch/pretrain.py --config configs/tiny-cpu.yaml run_dir="$root/$method" selection.method="$method" "$@"
done
echo
echo "=== GREATS vs Regular (same seed, same number of update steps, same k) ==="
python -m megatron_greats.report "$root/greats" "$root/regular"
echo
echo "curves: tensorboard --logdir $root"
