#!/usr/bin/env bash
# Multi-node training through the DeepSpeed launcher. Run from the repository root.
#
# All nodes from one machine, over ssh (pdsh, the default) or mpirun (openmpi):
#   launch/multinode.sh --hostfile hosts.txt [--launcher pdsh|openmpi] [--master-addr A] \
#       -- --config configs/llama-7b.yaml [dotted.key=value ...]
# One launcher per node, started by hand or by a scheduler (no ssh; run on every node):
#   launch/multinode.sh --nnodes 2 --node-rank 0 --master-addr node0 --gpus-per-node 8 \
#       -- --config configs/llama-7b.yaml
#
# Options (also accepted as --opt=value and with underscores):
#   --hostfile FILE       lines "host slots=N"; optional with --node-rank (one is generated)
#   --launcher L          pdsh (default) or openmpi
#   --nnodes N            use the first N hosts of the hostfile (--node-rank mode: number of nodes)
#   --node-rank R         start only this node's processes (DeepSpeed --no_ssh mode)
#   --master-addr A       address of node 0 (required with --node-rank)
#   --master-port P       default 29500
#   --gpus-per-node G     processes per node (required on CPU, where DeepSpeed counts NUMA nodes)
#   --launcher-args S     extra arguments for pdsh or mpirun, one quoted string
#   --local-test          openmpi on one machine as root: loopback-only flags, no ssh check
#   --dry-run             print the deepspeed command and exit
# Everything after "--" goes to launch/pretrain.py. OMP_NUM_THREADS defaults to 1.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_GREATS_VENV:-$REPO/.venv}"
die() { echo "multinode.sh: error: $*" >&2; exit 2; }

hostfile="" launcher=pdsh nnodes="" node_rank="" master_addr="" master_port=29500 gpus="" \
  launcher_args="" local_test=0 dry_run=0
while [ $# -gt 0 ]; do
  [[ "$1" == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  opt="${1//_/-}"
  case "$opt" in
    --) shift; break ;;
    --local-test) local_test=1; shift; continue ;;
    --dry-run) dry_run=1; shift; continue ;;
    --hostfile|--launcher|--nnodes|--node-rank|--master-addr|--master-port|--gpus-per-node|--launcher-args)
      [ $# -ge 2 ] || die "option $1 needs a value" ;;
    *) die "unknown option '$1' (see the top of launch/multinode.sh; pretrain.py arguments go after --)" ;;
  esac
  case "$opt" in
    --hostfile) hostfile="$2" ;;
    --launcher) launcher="$2" ;;
    --nnodes) nnodes="$2" ;;
    --node-rank) node_rank="$2" ;;
    --master-addr) master_addr="$2" ;;
    --master-port) master_port="$2" ;;
    --gpus-per-node) gpus="$2" ;;
    --launcher-args) launcher_args="$2" ;;
  esac
  shift 2
done
[ $# -gt 0 ] || die "no training arguments: add -- --config FILE [dotted.key=value ...]"
for pair in "nnodes:$nnodes" "node-rank:$node_rank" "master-port:$master_port" "gpus-per-node:$gpus"; do
  [[ "${pair#*:}" =~ ^[0-9]*$ ]] || die "--${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
done
[[ "$launcher" == pdsh || "$launcher" == openmpi ]] || die "--launcher must be pdsh or openmpi, got '$launcher'"
[ -z "$hostfile" ] || [ -f "$hostfile" ] || die "hostfile '$hostfile' does not exist"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
[ -x "$VENV/bin/deepspeed" ] && ! command -v deepspeed >/dev/null && export PATH="$VENV/bin:$PATH"
command -v deepspeed >/dev/null || die "deepspeed not found: activate the environment (source launch/setup_env.sh)"

cmd=(deepspeed)
if [ -n "$node_rank" ]; then
  # --no_ssh: this launcher starts only node R's processes. DeepSpeed still needs a hostfile that
  # lists every node (it takes ranks and world size from it); the host names are never contacted.
  [ -n "$master_addr" ] || die "--node-rank needs --master-addr (the address of node 0)"
  if [ -z "$hostfile" ]; then
    [ -n "$nnodes" ] && [ -n "$gpus" ] || die "--node-rank without --hostfile needs --nnodes and --gpus-per-node"
    hostfile="$(mktemp "${TMPDIR:-/tmp}/hostfile.XXXXXX")"
    trap 'rm -f "$hostfile"' EXIT
    for ((i = 0; i < nnodes; i++)); do echo "node$i slots=$gpus"; done > "$hostfile"
  fi
  cmd+=(--hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master_addr")
  [ -z "$nnodes" ] || cmd+=(--num_nodes "$nnodes")
  [ -z "$gpus" ] || cmd+=(--num_gpus "$gpus")
else
  [ -n "$hostfile" ] || die "give --hostfile (all nodes from here) or --node-rank (this node only); one node: deepspeed --num_gpus N"
  # pdsh/mpirun forward only PYTHON*/UCX*/... variables to the nodes, plus the lines of a
  # .deepspeed_env file: hand them ours (after any ~/.deepspeed_env or ./.deepspeed_env).
  envfile="$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")"
  trap 'rm -f "$envfile"' EXIT
  cat ~/.deepspeed_env ./.deepspeed_env 2>/dev/null | grep '=' > "$envfile" || true
  env | grep -E '^(OMP_NUM_THREADS|MEGATRON_GREATS_[A-Z_]*|HF_[A-Z_]*|TORCH_EXTENSIONS_DIR|NCCL_[A-Z_]*|GLOO_[A-Z_]*)=' \
    >> "$envfile" || true
  export DS_ENV_FILE="$envfile"  # an absolute name replaces the default .deepspeed_env
  cmd+=(--hostfile "$hostfile" --launcher "$launcher")
  [ -z "$master_addr" ] && [ "$local_test" = 1 ] && master_addr=127.0.0.1
  [ -z "$master_addr" ] || cmd+=(--master_addr "$master_addr")
  if [ "$launcher" = openmpi ]; then
    # DeepSpeed refuses --num_nodes/--num_gpus with openmpi: the hostfile's slots decide.
    [ -z "$nnodes$gpus" ] || die "--nnodes/--gpus-per-node do not work with --launcher openmpi; edit the hostfile slots"
    [ -x "$VENV/bin/mpirun" ] && ! command -v mpirun >/dev/null && export PATH="$VENV/bin:$PATH"
    cmd+=(--force_multi)  # also for a one-host hostfile
    # MPI rank discovery takes the port from MASTER_PORT, not from --master_port
    echo "MASTER_PORT=$master_port" >> "$envfile"
    if [ "$local_test" = 1 ]; then
      cmd+=(--no_ssh_check)
      launcher_args="--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo${launcher_args:+ $launcher_args}"
    fi
  else
    [ -z "$nnodes" ] || cmd+=(--num_nodes "$nnodes")
    [ -z "$gpus" ] || cmd+=(--num_gpus "$gpus")
  fi
  [ -z "$launcher_args" ] || cmd+=(--launcher_args "$launcher_args")
fi
[ "$node_rank" = "" ] || [ "$launcher" = pdsh ] || echo "multinode.sh: note: --launcher is ignored with --node-rank" >&2
cmd+=(--master_port "$master_port")
cmd+=("$REPO/launch/pretrain.py" "$@")

printf '+ OMP_NUM_THREADS=%s' "$OMP_NUM_THREADS"; printf ' %q' "${cmd[@]}"; echo
[ "$dry_run" = 0 ] || exit 0
"${cmd[@]}"
