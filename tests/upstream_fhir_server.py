"""A real, independent FHIR R4 server for tests of the upstream sync: Medplum's fhir-router with its
in-memory repository, served by `tests/upstream_fhir/server.mjs` under Node (installed by
scripts/setup.sh). It stands in for HAPI FHIR; where the two differ, the module docstring of
tests/test_upstream_fhir_server.py says how.

    with UpstreamFhirServer() as upstream:
        httpx.put(f"{upstream.base_url}/Patient/p1", json={...})
        upstream.fault("down")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import free_port

__all__ = ["UPSTREAM_DIR", "UpstreamFhirServer"]

UPSTREAM_DIR = Path(__file__).resolve().parent / "upstream_fhir"
_SERVER_SCRIPT = UPSTREAM_DIR / "server.mjs"
_INSTALLED_MARKER = UPSTREAM_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json"


def _missing(reason: str) -> None:
    """Skip the test, or fail it on CI, where setup.sh must have installed the server."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class UpstreamFhirServer:
    """Run `node tests/upstream_fhir/server.mjs` on a free port of 127.0.0.1 for a `with` block.

    `base_url` is the FHIR base (…/fhir); `fault()`, `stats()` and `reset()` drive the server's
    /admin endpoints, which sit outside the FHIR base. The server's one-line-per-request log goes
    to `log_path`.
    """

    def __init__(self, log_dir: Path | None = None, startup_timeout: float = 30.0) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        self.port = free_port()
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="upstream-fhir-")) / "server.log"
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._admin = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/admin", timeout=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> UpstreamFhirServer:
        node = shutil.which("node")
        if node is None:
            _missing("node is not installed: run scripts/setup.sh")
        if not _INSTALLED_MARKER.exists():
            _missing(f"{UPSTREAM_DIR / 'node_modules'} is missing: run scripts/setup.sh")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [str(node), str(_SERVER_SCRIPT), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=UPSTREAM_DIR,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"upstream FHIR server exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.base_url}/metadata", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"upstream FHIR server not ready after {self.startup_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _stop(self) -> None:
        self._admin.close()
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def fault(self, mode: str, **params: Any) -> dict[str, Any]:
        """Set the fault mode of every /fhir request: "none"; "down" (503 + Retry-After: 1);
        "slow" with `delay_ms` (the work is done, then the answer waits); "reject" with `match`
        (422 business-rule for each resource written whose JSON contains `match`)."""
        response = self._admin.post("/fault", json={"mode": mode, **params})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stats(self) -> dict[str, Any]:
        """Counts of /fhir requests since start or reset: `total`, `by_method`, `by_status`, and the
        current `fault`."""
        response = self._admin.get("/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset(self) -> None:
        """Empty the store, zero the stats and clear the fault mode."""
        self._admin.post("/reset").raise_for_status()
