#!/usr/bin/env bash
# The first thing to run on a GPU machine: one command, about 8 minutes on one GPU, and the numbers a
# user on GPUs asks for (docs/cluster.md, "Checking a GPU machine").
#   bash launch/gpu_check.sh [--out DIR] [--minutes M] [--wheels DIR]
#
#   --out DIR     where results go (default runs/gpu-check-<date>): summary.md (one table),
#                 results.json, steps.tsv, logs/<step>.log and each step's own outputs
#   --minutes M   time budget for the whole check, set-up included (default 8; 12 with 2+ GPUs).
#                 A step gets at most what is left; a step that would start with under 20 s left is
#                 skipped and recorded as such.
#   --wheels DIR  offline: a machine that cannot reach the package index. DIR is a folder made by
#                 launch/gpu_wheels.sh where the index is reachable; its wheels go on top of python3's
#                 own packages (its CUDA torch is kept, whatever its version) and nothing is fetched.
#
# Steps, in order (one function each, below): env (a CUDA torch wheel, then requirements.txt), data
# (the embedded corpus), tests (the device code paths on the GPU), quickstart-bf16 (GREATS vs Regular,
# 300 steps), bench-step-bf16 and bench-step-fp32, bench-ghost; with 2+ GPUs also dp2-bf16 and
# tp2-bf16 (the quickstart pair under the deepspeed launcher, NCCL).
#
# Environment:
#   GPU_CHECK_CUDA         CUDA tag of the torch wheel (default cu128; e.g. cu126)
#   GPU_CHECK_TORCH_INDEX  index holding that wheel (default https://download.pytorch.org/whl/$GPU_CHECK_CUDA)
#   GPU_CHECK_ANY_TORCH=1  keep an importable CUDA torch of another version than the pin
#   MEGATRON_GREATS_VENV   the virtual environment (default .venv; with --wheels the folder the wheels
#                          go to, default .venv-wheels: as launch/setup_env.sh)
#   PYTHON                 with --wheels: the Python whose CUDA torch is used (default python3)
#   GPU_CHECK_COMMIT       the commit to record where the copy has no .git (a copied working tree)
#
# Exit status: 0 every step ran and passed; 1 a step failed, timed out or was skipped for time (the
# others still ran; summary.md says which); 2 a bad option, or no CUDA GPU: nvidia-smi missing or
# listing no GPU (then nothing is installed or written), or torch.cuda.is_available() False once the
# environment is set up (then the folder holds the env step's log).
set -uo pipefail   # no -e: a failed step is recorded and the next one runs
# paths given on the command line are the caller's; everything else is the repository's
CALLER="$(pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

die() { echo "gpu_check: $*" >&2; exit 2; }

out="" minutes="" wheels=""
while [ $# -gt 0 ]; do
  [[ "$1" == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case "$1" in
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --out|--minutes|--wheels) [ $# -ge 2 ] || die "option $1 needs a value" ;;
    *) die "unknown option '$1'; allowed: --out DIR, --minutes M, --wheels DIR" ;;
  esac
  case "$1" in
    --out) out="$2"; [[ "$out" == /* ]] || out="$CALLER/$out" ;;
    --minutes) minutes="$2" ;;
    --wheels) wheels="$2"; [[ "$wheels" == /* ]] || wheels="$CALLER/$wheels" ;;
  esac
  shift 2
done
[ -z "$minutes" ] || { [[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v m="$minutes" 'BEGIN { exit !(m > 0) }'; } \
  || die "--minutes must be a positive number, got '$minutes'"
if [ -n "$wheels" ]; then
  compgen -G "$wheels/*.whl" >/dev/null \
    || die "--wheels '$wheels' is no folder of .whl files; make one with launch/gpu_wheels.sh"
  wheels="$(cd "$wheels" && pwd)"
fi

# ---- the GPU probe: first, so that a machine without a GPU gets one line and nothing installed -----
# nvidia-smi is the driver's own tool: without it (or without a GPU it lists) no CUDA torch can help.
# torch's view (torch.cuda.is_available()) is checked once the environment is set up (step_env).
probe_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 \
    || die "no CUDA GPU found (nvidia-smi not found); run it on a machine with an NVIDIA GPU"
  GPU_LIST="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)" || GPU_LIST=""
  [ -n "$GPU_LIST" ] \
    || die "no CUDA GPU found (nvidia-smi lists no GPU); run it on a machine with an NVIDIA GPU"
  NGPU="$(printf '%s\n' "$GPU_LIST" | grep -c .)"
}
probe_gpu

# ---- from here on: a GPU machine. Everything goes under $OUT. --------------------------------------
OUT="${out:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs" || die "cannot create --out folder '$OUT'"
OUT="$(cd "$OUT" && pwd)"
[ -n "$minutes" ] || { minutes=8; [ "$NGPU" -lt 2 ] || minutes=12; }
START="$(date +%s)"
DEADLINE="$(awk -v s="$START" -v m="$minutes" 'BEGIN { printf "%d", s + m * 60 }')"
if [ -n "$wheels" ]; then
  VENV="${MEGATRON_GREATS_VENV:-$REPO/.venv-wheels}"
  export MEGATRON_GREATS_WHEELS="$wheels"
else
  VENV="${MEGATRON_GREATS_VENV:-$REPO/.venv}"
fi
export MEGATRON_GREATS_VENV="$VENV"
# the pin lives in launch/setup_env.sh (TORCH_SPEC); the CUDA wheel is the same version
TORCH_VERSION="$(sed -n 's/.*TORCH_SPEC:-torch==\([0-9][0-9.]*\)}.*/\1/p' launch/setup_env.sh | head -1)"
GPU_CHECK_CUDA="${GPU_CHECK_CUDA:-cu128}"
GPU_CHECK_TORCH_INDEX="${GPU_CHECK_TORCH_INDEX:-https://download.pytorch.org/whl/$GPU_CHECK_CUDA}"
# the embedded default data, as configs/tiny-cpu.yaml has it (seq 128, vocabulary 4096)
DATA_CACHE="$REPO/data_cache"
export REPO OUT VENV NGPU TORCH_VERSION GPU_CHECK_CUDA GPU_CHECK_TORCH_INDEX DATA_CACHE
export GPU_CHECK_ANY_TORCH="${GPU_CHECK_ANY_TORCH:-0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
# with GPU_CHECK_ANY_TORCH=1, setup_env.sh must not replace the kept torch by the pin (in every step)
if [ "$GPU_CHECK_ANY_TORCH" = 1 ]; then export TORCH_SPEC=torch; fi

nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1
{
  echo "driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
  if commit="$(git rev-parse HEAD 2>/dev/null)"; then
    git diff --quiet HEAD 2>/dev/null || commit="$commit (modified)"
  else
    commit="${GPU_CHECK_COMMIT:-unknown (no git checkout)}"
  fi
  echo "commit=$commit"
  echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "minutes=$minutes"
  echo "wheels=${wheels:-none (the package index)}"
  echo "host=$(hostname)"
} > "$OUT/machine.txt"
printf 'step\tstatus\texit\tseconds\tnote\n' > "$OUT/steps.tsv"
echo "[gpu_check] $NGPU GPU(s): $(printf '%s\n' "$GPU_LIST" | head -1); budget $minutes min; results in $OUT"

# ---- the steps: each runs in its own bash under `timeout`, output in $OUT/logs/<step>.log ----------

step_env() {
  if [ -n "${MEGATRON_GREATS_WHEELS:-}" ]; then
    echo "[env] offline: the wheels of $MEGATRON_GREATS_WHEELS over ${PYTHON:-python3}'s own packages"
  else
    step_env_online || return 1
  fi
  # shellcheck disable=SC1091
  ( source launch/setup_env.sh && python - "$OUT/torch.json" ) <<'EOF'
import json, sys
import torch, deepspeed
from importlib.metadata import version
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "capability": [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())],
        "nccl": None if not torch.cuda.is_available() else
                (lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else str(v))(torch.cuda.nccl.version()),
        "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "deepspeed": deepspeed.__version__, "megatron_core": version("megatron-core"),
        "python": sys.version.split()[0], "executable": sys.executable}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
sys.exit(0 if info["cuda_available"] else 3)
EOF
}

step_env_online() {
  # A venv whose torch is the pinned version and sees the GPU is kept as it is. Otherwise: a new venv
  # reuses a system torch that sees the GPU (--system-site-packages), else the CUDA wheel of the pinned
  # version is installed from GPU_CHECK_TORCH_INDEX (a CPU build of the same version is replaced: its
  # local tag differs). Then launch/setup_env.sh installs the rest; its `pip install torch==X` is
  # satisfied by X+cuNNN, so it leaves the CUDA build in place.
  local check='import sys, torch, os
ok = torch.cuda.is_available() and (os.environ["GPU_CHECK_ANY_TORCH"] == "1"
                                    or torch.__version__.split("+")[0] == os.environ["TORCH_VERSION"])
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
sys.exit(0 if ok else 1)'
  if [ ! -x "$VENV/bin/python" ]; then
    if python3 -c "$check" 2>/dev/null; then
      echo "[env] a new venv that reuses the system's CUDA torch"
      python3 -m venv --system-site-packages "$VENV" || return 1
    else
      python3 -m venv "$VENV" || return 1
    fi
  fi
  if "$VENV/bin/python" -c "$check" 2>/dev/null; then
    echo "[env] keeping the installed torch"
  else
    echo "[env] installing torch==$TORCH_VERSION+$GPU_CHECK_CUDA from $GPU_CHECK_TORCH_INDEX"
    "$VENV/bin/python" -m pip install -q --upgrade pip || true
    "$VENV/bin/python" -m pip install "torch==$TORCH_VERSION+$GPU_CHECK_CUDA" \
      --extra-index-url "$GPU_CHECK_TORCH_INDEX" || return 1
  fi
}

step_data() {
  # Built once here, so that its minute is not charged to the first run that needs it.
  python -m megatron_greats.data --cache-dir "$DATA_CACHE" --seq-len 128 --vocab-size 4096
}

step_tests() {
  # The device code paths against independent references: the ghost Gram against torch.func in
  # float64, float32 and bf16 (in process, on the GPU through MEGATRON_GREATS_TEST_DEVICE=cuda), and
  # the end-to-end selections against tests/workers/reference.py with single_pass == two_pass (the
  # trainer takes the GPU by itself). Only one process per GPU: NCCL refuses two ranks on one device,
  # so the layouts' tests join with 2 GPUs (tp2, pp2, dp2) and 4 (tp2-pp2).
  local ids=(tests/test_ghost.py::test_mlp_with_biases
             tests/test_ghost.py::test_transformer_with_attention_norms_and_tied_embeddings
             tests/test_ghost.py::test_bf16_transformer_gram_matches_a_float64_copy
             tests/test_selection_training.py::test_selection_in_one_process_matches_an_independent_reference
             tests/test_selection_training.py::test_single_pass_equals_two_pass_in_one_process_under_plain_sgd
             tests/test_cheap_scoring.py::test_single_pass_with_a_prefilter_equals_two_pass_under_plain_sgd
             tests/test_cheap_scoring.py::test_single_pass_with_a_window_takes_two_pass_steps)
  if [ "$NGPU" -ge 2 ]; then
    ids+=("tests/test_selection_training.py::test_selection_at_a_layout_matches_the_reference[tp2]"
          "tests/test_selection_training.py::test_selection_at_a_layout_matches_the_reference[pp2]"
          "tests/test_selection_training.py::test_update_equals_an_ordinary_step_on_the_selected_samples[dp2-zero1]")
  fi
  if [ "$NGPU" -ge 4 ]; then
    ids+=("tests/test_selection_training.py::test_selection_at_a_layout_matches_the_reference[tp2-pp2]")
  fi
  mkdir -p "$OUT/tests"
  MEGATRON_GREATS_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider -n 0 \
    --junitxml="$OUT/tests/junit.xml" "${ids[@]}"
}

train_pair() {  # FOLDER [launcher args ...] -- [overrides ...]: GREATS then Regular, same seed, bf16
  local folder="$1"; shift
  local launcher=() overrides=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do launcher+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  overrides=("$@")
  local rc=0 method
  for method in greats regular; do
    echo "[pair] $method into $folder/$method"
    # bf16 needs ZeRO-1 (fp32 master weights, docs/training.md); 300 steps: the quickstart's length
    "${launcher[@]}" launch/pretrain.py --config configs/tiny-cpu.yaml run_dir="$folder/$method" \
      data.cache_dir="$DATA_CACHE" selection.method="$method" train.steps=300 train.precision=bf16 \
      zero.stage=1 train.progress=false "${overrides[@]}" || rc=1
  done
  # test loss at equal steps, at Regular's wall time, and the time to reach Regular's final loss
  python -m megatron_greats.report "$folder/greats" "$folder/regular" | tee "$folder/report.txt" || rc=1
  return "$rc"
}

step_quickstart() {
  train_pair "$OUT/quickstart-bf16" python
}

deepspeed_pair() {  # FOLDER [overrides ...]: the pair on 2 GPUs under the deepspeed launcher (NCCL)
  local folder="$1"; shift
  local port
  port="$(python -c 'from megatron_greats.parallel.state import free_port; print(free_port())')"
  # a hostfile that does not exist: DeepSpeed then runs on this machine's GPUs, even where a
  # /job/hostfile exists (its default, docs/cluster.md "DeepSpeed launcher notes")
  train_pair "$folder" deepspeed --hostfile "$OUT/no-hostfile" --num_gpus 2 --master_port "$port" -- "$@"
}

step_dp2() { deepspeed_pair "$OUT/dp2-bf16"; }
step_tp2() { deepspeed_pair "$OUT/tp2-bf16" parallel.tensor=2; }

bench_step() {  # FOLDER [overrides ...]
  # Regular(k), Regular(N), Regular(N+m), GREATS two_pass and single_pass, and the cheap setting the
  # README recommends (a 16-token window on the top layer): time and peak device memory per step.
  local folder="$1"; shift
  python -m megatron_greats.bench step --config configs/tiny-cpu.yaml --out "$folder" \
    --cheap "window16+top1:selection.score_window=16,selection.score_layers=1" \
    data.cache_dir="$DATA_CACHE" train.progress=false selection.candidates=32 "$@"
}

# GPT-2-small width (12 x 768) at the default's sequence and batch, in bf16: a GPU-sized step
step_bench_step_bf16() {
  bench_step "$OUT/bench-step-bf16" model.num_layers=12 model.hidden_size=768 model.num_heads=12 \
    train.precision=bf16 zero.stage=1
}
# the embedded default as it is (fp32): the same run as the CPU tables in docs/performance.md
step_bench_step_fp32() { bench_step "$OUT/bench-step-fp32"; }

step_bench_ghost() {
  # the points of docs/results/bench_ghost.json (the CPU numbers), one round; each measurement runs
  # in a process of its own, so process start-up, not the GPU, sets most of this step's time
  mkdir -p "$OUT/bench-ghost"
  python -m megatron_greats.bench ghost --points 8,128,128 32,256,256 16,512,256 32,128,1024 \
    --min-seconds 0.5 --json "$OUT/bench-ghost/bench_ghost.json"
}

# ---- running the steps: time limits, records, the summary ------------------------------------------
FAILED=0
summarise() {  # results.json and summary.md from what is there so far (also after each step)
  local py="python3"
  [ -x "$VENV/bin/python" ] && py="$VENV/bin/python"
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$py" launch/gpu_check_summary.py "$OUT" >/dev/null \
    2>>"$OUT/logs/summary.log" || echo "[gpu_check] note: the summary could not be written (logs/summary.log)"
}

record() {  # NAME STATUS EXIT SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/steps.tsv"
  summarise
}

run_step() {  # NAME CAP_SECONDS FUNCTION: run FUNCTION under min(CAP, time left); record how it ended
  local name="$1" cap="$2" fn="$3" now left limit t0 rc seconds status
  now="$(date +%s)"; left=$((DEADLINE - now))
  if [ "$left" -lt 20 ]; then
    echo "[gpu_check] $name: skipped (out of time; --minutes $minutes)"
    record "$name" skipped "" 0 "out of time (--minutes $minutes)"; FAILED=1; return
  fi
  limit=$((cap < left ? cap : left))
  echo "[gpu_check] $name (at most ${limit} s) ..."
  t0="$(date +%s.%N)"
  # timeout signals the whole process group: launchers' children (deepspeed, torchrun) stop too
  timeout -k 10 "$limit" bash -c "set -o pipefail; $fn" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  seconds="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; FAILED=1
  else status=failed; FAILED=1
  fi
  echo "[gpu_check] $name: $status (exit $rc, $seconds s)"
  [ "$status" = ok ] || tail -n 5 "$OUT/logs/$name.log" | sed 's/^/    /'
  record "$name" "$status" "$rc" "$seconds" ""
}

not_run() {  # NAME REASON: a step that does not apply here (not a failure)
  echo "[gpu_check] $1: not run ($2)"
  record "$1" "not run" "" 0 "$2"
}

export -f step_env step_env_online step_data step_tests train_pair step_quickstart deepspeed_pair step_dp2 step_tp2 \
  bench_step step_bench_step_bf16 step_bench_step_fp32 step_bench_ghost

run_step env 600 step_env
if ! grep -q "^env	ok	" "$OUT/steps.tsv"; then
  # nothing else can run; torch that does not see the GPU is the no-GPU case seen from torch
  if grep -q '"cuda_available": false' "$OUT/torch.json" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False; see $OUT/logs/env.log); run it on a machine with an NVIDIA GPU" >&2
    exit 2
  fi
  echo "gpu_check: the environment could not be set up; see $OUT/logs/env.log" >&2
  exit 1
fi
# the environment the steps share: the venv on PATH, setup_env.sh's variables (instant: its stamp)
# shellcheck disable=SC1091
source launch/setup_env.sh >/dev/null
set +e  # setup_env.sh sets -e for itself; here a step's failure is recorded instead
NGPU="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo "$NGPU")"
export NGPU

run_step data 240 step_data
run_step tests 300 step_tests
run_step quickstart-bf16 240 step_quickstart
run_step bench-step-bf16 150 step_bench_step_bf16
run_step bench-step-fp32 120 step_bench_step_fp32
run_step bench-ghost 150 step_bench_ghost
if [ "$NGPU" -ge 2 ]; then
  run_step dp2-bf16 240 step_dp2
  run_step tp2-bf16 240 step_tp2
else
  not_run dp2-bf16 "1 GPU"
  not_run tp2-bf16 "1 GPU"
fi

echo
cat "$OUT/summary.md" 2>/dev/null
echo
echo "written: $OUT/summary.md, $OUT/results.json, $OUT/logs/"
exit "$FAILED"
