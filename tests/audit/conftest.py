"""Audit test fixtures: the facade with auditing on, as create_app will wire it.

Until app.py calls them itself, `audited()` adds the correlation middleware and the audit
middleware to the app `serve()` built and starts/stops the recorder around its lifespan; both
installs are idempotent, so this stays correct once app.py does it too.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fhir_facade.audit import AuditRecorder, install_audit
from fhir_facade.audit.event import CORRELATION_ENTITY_TYPE
from fhir_facade.correlation import install_correlation
from tests.conftest import LiveServer, serve


def audited(overrides: dict[str, Any], *, port: int | None = None) -> LiveServer:
    """A LiveServer (not started) with `audit_enabled` on and correlation ids."""
    server = serve({"audit_enabled": True, **overrides}, port=port)
    app = server.app
    recorder = install_audit(app, app.state.settings, app.state.store)
    assert recorder is not None
    install_correlation(app)
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
        async with original(application) as state:
            await recorder.start()
            try:
                yield state
            finally:
                await recorder.stop()

    app.router.lifespan_context = lifespan
    return server


def recorder_of(server: LiveServer) -> AuditRecorder:
    recorder = server.app.state.audit
    assert isinstance(recorder, AuditRecorder)
    return recorder


def correlation_of(event: dict[str, Any]) -> str | None:
    """The correlation id an AuditEvent carries (its BALP transaction entity)."""
    for entity in event.get("entity", []):
        if entity.get("type", {}).get("code") == CORRELATION_ENTITY_TYPE["code"]:
            value: str = entity["what"]["identifier"]["value"]
            return value
    return None


def query_of(event: dict[str, Any]) -> str | None:
    for entity in event.get("entity", []):
        if "query" in entity:
            return base64.b64decode(entity["query"]).decode()
    return None


def audit_events(fhir: httpx.Client) -> list[dict[str, Any]]:
    """Every AuditEvent the facade holds (this search is audited too, after it answers)."""
    response = fhir.get("/AuditEvent", params={"_count": "500", "_sort": "-date"})
    assert response.status_code == 200, response.text
    return [entry["resource"] for entry in response.json().get("entry", [])]


def events_with(fhir: httpx.Client, correlation: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The AuditEvents of the request with this correlation id, once at least one is stored."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_events(fhir) if correlation_of(e) == correlation]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def unique() -> Callable[[str], str]:
    counter = iter(range(1_000_000))
    stamp = f"{time.monotonic_ns():x}"
    return lambda label: f"{label}-{stamp}-{next(counter)}"
