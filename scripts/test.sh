#!/usr/bin/env bash
# The whole test suite: lint, type check, then pytest against a real Orthanc the tests start.
# pytest's exit code 5 (no tests collected) fails this script like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
# VENV (default .venv): the virtualenv setup.sh makes and this script runs.
export VENV="${VENV:-.venv}"
bash scripts/setup.sh test
# The store tests run on PostgreSQL too: the machine's server on 127.0.0.1:5432 (start it if down).
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
fi
echo "== ruff"; "$VENV"/bin/ruff check fhir_facade tests bench
echo "== mypy"; "$VENV"/bin/mypy
echo "== pytest"; "$VENV"/bin/python -m pytest "$@"
