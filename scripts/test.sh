#!/usr/bin/env bash
# The whole test suite: lint, type check, then pytest against a real Orthanc the tests start.
# pytest's exit code 5 (no tests collected) fails this script like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check fhir_facade tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
