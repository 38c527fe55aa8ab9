"""Fixtures of the $analyze tests: a real KServe v2 inference server (kserve's ModelServer in its
own virtualenv, .venv-kserve, made by scripts/setup.sh) serving the default model."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.embedded import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"
KSERVE_SERVER = REPO / "tests" / "kserve_server" / "onnx_model_server.py"
MODEL_ID = "brain-tumor-vgg16"


@pytest.fixture(scope="session")
def kserve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real kserve ModelServer serving the default model on a free port, REST only."""
    if not KSERVE_PYTHON.exists():
        reason = f"{KSERVE_PYTHON} is missing: run scripts/setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    manifest = load_manifests()[MODEL_ID]
    port = free_port()
    log_path = tmp_path_factory.mktemp("kserve") / "server.log"
    url = f"http://127.0.0.1:{port}"
    command = [
        str(KSERVE_PYTHON),
        str(KSERVE_SERVER),
        str(manifest.model_path),
        "--model-name",
        MODEL_ID,
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"kserve server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"kserve server not ready after 90 s:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v2/models/{MODEL_ID}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        stop_process(process, timeout=15)
