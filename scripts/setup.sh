#!/usr/bin/env bash
# Install what the facade and its tests need on a fresh Debian machine, idempotently:
# Debian packages (Orthanc + DICOMweb, dcmtk, docker-compose, the demo MRI) and a virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk docker-compose mricron-data)
# Test-only: the real browser of tests/test_api_docs.py (Debian's chromium and its chromedriver).
TEST_APT_PACKAGES=(chromium chromium-driver)
missing=()
for pkg in "${APT_PACKAGES[@]}" "${TEST_APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The package may start a system-wide Orthanc on 8042; the facade runs its own instances.
  $sudo_cmd service orthanc stop >/dev/null 2>&1 || true
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fhir-facade-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "setup: installing the package and test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$wanted" > "$stamp"
fi

# A KServe v2 model server for the inference tests (tests/kserve_server/onnx_model_server.py).
# kserve pins its own FastAPI/pydantic, so it gets its own virtualenv, never the facade's.
# About 50 s and 530 MB; SETUP_KSERVE=0 skips it (the KServe tests then skip, or fail when CI=true).
KSERVE_REQUIREMENTS=("kserve>=0.21,<0.22" "onnxruntime>=1.17" "numpy>=1.26")
if [ "${SETUP_KSERVE:-1}" != 0 ]; then
  if [ ! -x .venv-kserve/bin/python ]; then
    echo "setup: creating .venv-kserve"
    "$PYTHON" -m venv .venv-kserve
  fi
  kserve_stamp=.venv-kserve/.kserve-installed
  kserve_wanted=$(printf '%s\n' "${KSERVE_REQUIREMENTS[@]}" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$kserve_stamp" ] || [ "$(cat "$kserve_stamp")" != "$kserve_wanted" ]; then
    echo "setup: installing kserve into .venv-kserve"
    .venv-kserve/bin/python -m pip install -q --upgrade pip
    .venv-kserve/bin/python -m pip install -q "${KSERVE_REQUIREMENTS[@]}"
    echo "$kserve_wanted" > "$kserve_stamp"
  fi
fi

# An independent upstream FHIR server for the sync tests (tests/upstream_fhir/server.mjs: Medplum's
# @medplum/fhir-router 4.5.2 + MemoryRepository, pinned in package-lock.json). Needs Node >= 20.19;
# `npm ci` takes about 3 s and 104 MB. SETUP_UPSTREAM=0 skips it (the upstream tests then skip, or
# fail when CI=true).
if [ "${SETUP_UPSTREAM:-1}" != 0 ]; then
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    echo "setup: installing Debian packages: nodejs npm"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends nodejs npm
  fi
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
    echo "setup: node $(node --version) is older than 20.19, which @medplum/fhir-router 4.5.2 needs;" \
      "skipping tests/upstream_fhir (install a newer Node, e.g. from NodeSource)" >&2
  else
    upstream_stamp=tests/upstream_fhir/node_modules/.fhir-facade-installed
    upstream_wanted=$(sha256sum tests/upstream_fhir/package-lock.json | cut -d' ' -f1)
    if [ ! -f "$upstream_stamp" ] || [ "$(cat "$upstream_stamp")" != "$upstream_wanted" ]; then
      echo "setup: installing tests/upstream_fhir (npm ci)"
      (cd tests/upstream_fhir && npm ci --no-audit --no-fund)
      echo "$upstream_wanted" > "$upstream_stamp"
    fi
  fi
fi
