"""Audit test fixtures: the facade with auditing on, and reading back what it recorded."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from fhir_facade.audit import AuditRecorder
from fhir_facade.audit.event import CORRELATION_IDENTIFIER_TYPE
from fhir_facade.fhir.search import parse_search
from fhir_facade.store import ResourceStore, create_store_engine, search_param_defs, upgrade
from tests.conftest import LiveServer, serve


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh SQLite store at the current schema version."""
    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def audited(overrides: dict[str, Any], *, port: int | None = None) -> LiveServer:
    """A LiveServer (not started) with `audit_enabled` on (create_app wires the audit middleware,
    the recorder and correlation ids)."""
    return serve({"audit_enabled": True, **overrides}, port=port)


def stored_events(store: ResourceStore, count: int = 50) -> tuple[list[dict[str, Any]], int]:
    """The AuditEvents in `store` (at most `count`) and how many there are, read from the store
    itself rather than through the API."""
    request = parse_search(
        "AuditEvent",
        [("_count", str(count))],
        search_param_defs("AuditEvent"),
        base_url="http://127.0.0.1/fhir",
        strict=True,
        default_count=count,
        max_count=count,
    )
    return store.search(request)


def recorder_of(server: LiveServer) -> AuditRecorder:
    recorder = server.app.state.audit
    assert isinstance(recorder, AuditRecorder)
    return recorder


def correlation_of(event: dict[str, Any]) -> str | None:
    """The correlation id an AuditEvent carries (its X-Request-Id entity)."""
    for entity in event.get("entity", []):
        identifier = entity.get("what", {}).get("identifier", {})
        if identifier.get("type") == CORRELATION_IDENTIFIER_TYPE:
            value: str = identifier["value"]
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


def events_with(
    fhir: httpx.Client, correlation: str, timeout: float = 10.0, *, at_least: int = 1
) -> list[dict[str, Any]]:
    """The AuditEvents of the request with this correlation id, once `at_least` of them are stored."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_events(fhir) if correlation_of(e) == correlation]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def unique() -> Callable[[str], str]:
    counter = iter(range(1_000_000))
    stamp = f"{time.monotonic_ns():x}"
    return lambda label: f"{label}-{stamp}-{next(counter)}"
