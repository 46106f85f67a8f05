#!/usr/bin/env bash
# README command 1: set up (or reuse) .venv, build the embedded default data, pretrain the tiny CPU config.
#   bash launch/quickstart.sh [dotted.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh

run_dir="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
echo "[quickstart] training configs/tiny-cpu.yaml into $run_dir"
python launch/pretrain.py --config configs/tiny-cpu.yaml run_dir="$run_dir" "$@"
