"""A ResourceStore whose versions get outbox rows, as the app wires it when an upstream is set."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from fhir_facade.store import ResourceStore
from fhir_facade.sync.outbox_queue import OutboxQueue


def store_with_outbox(engine: Engine, clock: Callable[[], datetime] | None = None) -> ResourceStore:
    store = ResourceStore(engine, clock=clock)
    OutboxQueue(engine).subscribe_to(store.bus)
    return store
