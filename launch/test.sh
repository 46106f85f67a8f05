#!/usr/bin/env bash
# README command 2: set up (or reuse) .venv, then run the whole test suite.
#   bash launch/test.sh [pytest args ...]
# Tests run in MEGATRON_GREATS_TEST_WORKERS pytest-xdist workers (default 2; 0: in this process). Most
# tests start one training process that is single-threaded for most of its life (imports, set-up), so a
# second worker keeps the second core busy: on 2 cores the suite takes about two thirds of its serial time.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
set +e
workers="${MEGATRON_GREATS_TEST_WORKERS:-2}"
case "$workers" in
  ''|*[!0-9]*) echo "[test] error: MEGATRON_GREATS_TEST_WORKERS=$workers; allowed: a whole number (0: no workers)" >&2
               exit 2 ;;
esac
python -m pytest -q -n "$workers" --dist worksteal "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests (exit code 5); nothing failed" >&2
  exit 0
fi
exit "$rc"
