#!/usr/bin/env bash
# Selection methods side by side on the embedded default: regular, greats, first_order, gradnorm,
# maxloss (and rholoss with --reference-checkpoint) or --arm variants, 3 seeds each, equal update steps and k.
# Writes summary.md, summary.json, plots/*.png and TensorBoard runs into one folder.
#   bash launch/compare.sh [--out DIR] [--quick] [--seeds S] [--methods a,b] [--reference-checkpoint DIR] [-- key=value ...]
# About 1.5 hours on 2 CPU cores at the default size (600 steps); --quick is a smoke version (a minute or two).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; break; fi
  args+=("$1"); shift
done
exec python -m megatron_greats.compare "${args[@]}" -- "$@"
