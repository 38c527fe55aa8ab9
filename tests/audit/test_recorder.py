"""The AuditRecorder on a real store: batches in one transaction, backpressure instead of loss,
`stop()` flushes what is queued, a bad event costs only itself, and each event's outbox row
carries its request's correlation id."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from fhir_facade.audit import AuditRecorder, audit_event, describe_interaction
from fhir_facade.store import ResourceStore
from fhir_facade.store.schema import OutboxEntry
from tests.audit.conftest import stored_events
from tests.conftest import validate
from tests.outbox_store import store_with_outbox


def event(n: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    built = audit_event(
        describe_interaction("GET", f"/fhir/Task/t-{n}"),
        status=200,
        access=None,
        client_address="127.0.0.1",
        correlation_id=f"req-{n}",
        site="http://127.0.0.1",
        started=now,
        ended=now,
    )
    validate(built)
    return built


def test_stop_flushes_every_queued_event(engine: Engine) -> None:
    store = store_with_outbox(engine)
    recorder = AuditRecorder(store, batch_size=50)

    async def scenario() -> int:
        await recorder.start()
        for n in range(250):
            await recorder.record(event(n), f"req-{n}")
        queued = recorder._queue.qsize()  # nothing written yet: the writer has not run
        await recorder.stop()
        return queued

    assert asyncio.run(scenario()) == 250
    assert stored_events(store)[1] == 250
    assert recorder.recorded == 250 and recorder.failed == 0
    with engine.connect() as connection:
        outbox = OutboxEntry.__table__  # type: ignore[attr-defined]
        rows = connection.execute(select(outbox.c.resource_type, outbox.c.correlation_id)).all()
    assert sorted(r.correlation_id for r in rows) == sorted(f"req-{n}" for n in range(250))
    assert {r.resource_type for r in rows} == {"AuditEvent"}


def test_a_full_queue_makes_the_request_wait(engine: Engine) -> None:
    store = ResourceStore(engine)
    recorder = AuditRecorder(store, queue_size=2, batch_size=1)

    async def scenario() -> None:
        await recorder.start()
        await asyncio.gather(*(recorder.record(event(n)) for n in range(40)))
        await recorder.flush()
        assert recorder._queue.qsize() == 0
        await recorder.stop()

    asyncio.run(scenario())
    assert stored_events(store)[1] == 40 and recorder.recorded == 40


def test_without_the_writer_events_are_written_at_once(engine: Engine) -> None:
    store = ResourceStore(engine)
    recorder = AuditRecorder(store)
    asyncio.run(recorder.record(event(1)))
    assert stored_events(store)[1] == 1
    asyncio.run(recorder.stop())  # never started: nothing to do


def test_a_bad_event_costs_only_itself(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    store = ResourceStore(engine)
    recorder = AuditRecorder(store)
    broken = {**event(2), "outcome": "not-a-code", "action": 7}

    async def scenario() -> None:
        await recorder.start()
        await recorder.record(event(1))
        await recorder.record(broken)
        await recorder.record(event(3))
        await recorder.stop()

    with caplog.at_level(logging.ERROR, logger="fhir_facade.audit.recorder"):
        asyncio.run(scenario())
    assert stored_events(store)[1] == 2
    assert (recorder.recorded, recorder.failed) == (2, 1)
    assert any("not-a-code" in r.getMessage() for r in caplog.records), "the lost event is in the log"


def test_bad_sizes_are_refused(engine: Engine) -> None:
    store = ResourceStore(engine)
    with pytest.raises(ValueError, match="queue_size"):
        AuditRecorder(store, queue_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        AuditRecorder(store, batch_size=0)
