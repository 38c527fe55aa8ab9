#!/usr/bin/env bash
# The embedded default: a local Orthanc (Debian packages) with the demo brain MRI study, and the
# facade on http://127.0.0.1:8080/fhir. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
# VENV (default .venv): the virtualenv setup.sh makes and this script runs.
export VENV="${VENV:-.venv}"
bash scripts/setup.sh run
exec "$VENV"/bin/fhir-facade embedded --host 127.0.0.1 --port "${PORT:-8080}"
