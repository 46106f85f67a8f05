#!/usr/bin/env bash
# README command 2: set up (or reuse) .venv, then run the whole test suite.
#   bash launch/test.sh [pytest args ...]
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
set +e
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests (exit code 5); nothing failed" >&2
  exit 0
fi
exit "$rc"
