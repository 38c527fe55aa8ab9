"""AuditEvents go upstream like every stored type: through the outbox (with the audited request's
correlation id) to a real, independent FHIR server (Medplum's fhir-router, tests/upstream_fhir),
which validates them on the way in."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.store import create_store_engine
from fhir_facade.store.schema import OutboxEntry
from tests.audit.conftest import audited, events_with
from tests.conftest import ok_json, outcome
from tests.upstream_fhir_server import UpstreamFhirServer


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamFhirServer]:
    with UpstreamFhirServer() as server:
        yield server


def test_audit_events_are_synced_upstream(
    loaded_orthanc: EmbeddedOrthanc, upstream: UpstreamFhirServer
) -> None:
    upstream.reset()
    database = f"sqlite:///{tempfile.mkdtemp(prefix='facade-audit-')}/store.sqlite3"
    overrides = {
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "fhir_upstream_url": upstream.base_url,
        "sync_poll_interval": 0.1,
        "database_url": database,
    }
    with audited(overrides) as server, httpx.Client(base_url=server.base_url, timeout=30) as fhir:
        outcome(fhir.get("/Observation/nowhere", headers={"X-Correlation-ID": "sync-404"}), 404, "not-found")
        ok_json(fhir.get("/Patient", params={"_count": "1"}, headers={"X-Correlation-ID": "sync-search"}))
        events = events_with(fhir, "sync-404") + events_with(fhir, "sync-search")
        assert len(events) == 2

        def upstream_has_them() -> bool:
            return all(
                httpx.get(f"{upstream.base_url}/AuditEvent/{e['id']}", timeout=10).status_code == 200
                for e in events
            )

        deadline = time.monotonic() + 15
        while not upstream_has_them():
            assert time.monotonic() < deadline, f"not upstream: {upstream.log_tail()}"
            time.sleep(0.1)
        status = ok_json(fhir.get("/$sync-status"))
        dead = next(p["valueInteger"] for p in status["parameter"] if p["name"] == "dead")
        assert dead == 0
    mirrored = httpx.get(f"{upstream.base_url}/AuditEvent/{events[0]['id']}", timeout=10).json()
    assert mirrored["outcome"] == "4"
    engine = create_store_engine(database)
    try:
        outbox = OutboxEntry.__table__  # type: ignore[attr-defined]
        with engine.connect() as connection:
            rows = connection.execute(
                select(outbox.c.resource_id, outbox.c.correlation_id, outbox.c.state).where(
                    outbox.c.resource_type == "AuditEvent"
                )
            ).all()
    finally:
        engine.dispose()
    by_id = {r.resource_id: (r.correlation_id, r.state) for r in rows}
    assert by_id[events[0]["id"]] == ("sync-404", "sent")
    assert by_id[events[1]["id"]] == ("sync-search", "sent")
