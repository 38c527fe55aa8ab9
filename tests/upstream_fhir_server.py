"""A real, independent FHIR R4 server for tests of the upstream sync: Medplum's fhir-router with its
in-memory repository, served by `tests/upstream_fhir/server.mjs` under Node (installed by
scripts/setup.sh). It stands in for HAPI FHIR; where the two differ, the module docstring of
tests/test_upstream_fhir_server.py says how.

    with UpstreamFhirServer() as upstream:
        httpx.put(f"{upstream.base_url}/Patient/p1", json={...})
        upstream.fault("down")

    # SMART Backend Services: every /fhir request but metadata then needs a token from token_url.
    with UpstreamFhirServer(smart_jwks={"keys": [public_jwk]}, smart_client_id="sync") as upstream:
        ...
"""

from __future__ import annotations

import json
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

from fhir_facade.embedded import free_port, stop_process

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

    With `smart_jwks` (a JWKS of public keys for `smart_client_id`) the server starts as a SMART
    Backend Services server: /fhir/.well-known/smart-configuration, a token endpoint at
    `token_url`, and a bearer token required for every /fhir request but metadata. `smart()` does
    the same on a running server.
    """

    def __init__(
        self,
        log_dir: Path | None = None,
        startup_timeout: float = 30.0,
        *,
        smart_jwks: dict[str, Any] | None = None,
        smart_client_id: str = "facade-sync",
        smart_token_lifetime: float = 300,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        if smart_jwks is not None and not smart_jwks.get("keys"):
            raise ValueError('smart_jwks must be a JWKS: {"keys": [...]} with at least one key')
        if not smart_client_id:
            raise ValueError("smart_client_id must not be empty")
        if smart_token_lifetime <= 0:
            raise ValueError(f"smart_token_lifetime must be positive, got {smart_token_lifetime}")
        self.port = free_port()
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="upstream-fhir-")) / "server.log"
        self.startup_timeout = startup_timeout
        self.smart_jwks = smart_jwks
        self.smart_client_id = smart_client_id
        self.smart_token_lifetime = smart_token_lifetime
        self._process: subprocess.Popen[bytes] | None = None
        self._admin = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/admin", timeout=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        """The SMART token endpoint (answers only once SMART is configured)."""
        return f"http://127.0.0.1:{self.port}/auth/token"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> UpstreamFhirServer:
        node = shutil.which("node")
        if node is None:
            _missing("node is not installed: run scripts/setup.sh")
        if not _INSTALLED_MARKER.exists():
            _missing(f"{UPSTREAM_DIR / 'node_modules'} is missing: run scripts/setup.sh")
        command = [str(node), str(_SERVER_SCRIPT), "--port", str(self.port)]
        if self.smart_jwks is not None:
            jwks_path = self.log_path.with_name("smart-jwks.json")
            jwks_path.write_text(json.dumps(self.smart_jwks))
            command += ["--smart-jwks", str(jwks_path), "--smart-client-id", self.smart_client_id]
            command += ["--smart-token-lifetime", str(self.smart_token_lifetime)]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
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
        stop_process(self._process)
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
        """Counts of /fhir requests since start or reset: `total`, `by_method`, `by_status`, the
        current `fault`, and `smart` (`enabled`, `token_requests`, `tokens_issued`,
        `token_refusals` by OAuth error, `invalid_token` 401s)."""
        response = self._admin.get("/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset(self) -> None:
        """Empty the store, zero the stats and clear the fault mode (the SMART set-up stays)."""
        self._admin.post("/reset").raise_for_status()

    def smart(self, client_id: str, jwks: dict[str, Any], token_lifetime: float | None = None) -> None:
        """Register (or replace) a SMART backend client's public keys; SMART is then on."""
        body: dict[str, Any] = {"client_id": client_id, "jwks": jwks}
        if token_lifetime is not None:
            body["token_lifetime_s"] = token_lifetime
        self._admin.post("/smart", json=body).raise_for_status()

    def smart_off(self) -> None:
        """Forget every SMART client and token: /fhir is open again."""
        self._admin.delete("/smart").raise_for_status()

    def revoke_tokens(self) -> int:
        """Revoke every access token issued so far (the next request with one gets 401)."""
        response = self._admin.post("/smart/revoke")
        response.raise_for_status()
        revoked: int = response.json()["revoked"]
        return revoked
