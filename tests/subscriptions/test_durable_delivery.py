"""Durable, replica-safe delivery (docs/adr/0026-subscriptions-design.md, "Durable delivery"):

- three facade OS processes (`python -m fhir_facade serve`) on one PostgreSQL database share the
  delivery of 100 Task changes to three subscriptions: one real receiver gets every event number
  of each subscription once, in order, from more than one replica;
- a facade process SIGKILLed while a slow receiver holds a notification, restarted on the same
  database, delivers every event, including those written while it was down; the receiver sees at
  most the one in-flight event twice, and dropping repeats by event number gives exactly 1..N.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.store import ResourceStore, create_store_engine
from fhir_facade.subscriptions.matching import SubscriptionMatcher
from fhir_facade.subscriptions.tables import EVENT, STATE
from fhir_facade.subscriptions.topics import topics
from tests.conftest import ok_json
from tests.facade_process import FacadeProcess, wait_for
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TASK_TOPIC, subscription, task

STATUSES = ("received", "accepted", "in-progress", "completed")


def process_env(database_url: str, orthanc: EmbeddedOrthanc, receiver: Receiver, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "FACADE_DATABASE_URL": database_url,
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        "FACADE_ANALYZE_ENABLED": "false",
        "FACADE_WATCH_STUDIES": "false",
        "FACADE_LOG_LEVEL": "WARNING",
        "FACADE_SUBSCRIPTION_ENDPOINTS": json.dumps([f"http://127.0.0.1:{receiver.port}/"]),
        "FACADE_SUBSCRIPTION_POLL_INTERVAL": "0.05",
        "FACADE_SUBSCRIPTION_RETRY_SECONDS": "0.2",
        # A killed replica's leases come back soon (each delivered event renews the lease).
        "FACADE_SUBSCRIPTION_LEASE_SECONDS": "3",
    }


def numbers(receiver: Receiver, path: str) -> list[int]:
    """The event numbers received at `path`, in arrival order (handshakes have none)."""
    found = []
    for bundle in receiver.bundles(path):
        for event in status_of(bundle).get("events", []):
            found.append(int(event["event-number"]))
    return found


def senders(receiver: Receiver, path: str) -> set[str]:
    """The FHIR bases (one per replica: each has its own FACADE_BASE_URL) that sent to `path`."""
    return {
        status_of(b)["subscription"]["reference"].split("/Subscription/")[0] for b in receiver.bundles(path)
    }


def active(http: httpx.Client, body: dict[str, Any]) -> str:
    created = ok_json(http.post("Subscription", json=body), 201)
    wait_for(lambda: ok_json(http.get(f"Subscription/{created['id']}"))["status"] == "active", 20)
    return str(created["id"])


@pytest.fixture
def replicas(
    postgres_url: str, orthanc: EmbeddedOrthanc, receiver: Receiver
) -> Iterator[list[FacadeProcess]]:
    processes: list[FacadeProcess] = []
    try:
        for _ in range(3):
            port = free_port()
            process = FacadeProcess(process_env(postgres_url, orthanc, receiver, port), port)
            processes.append(process)
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()


def test_three_replicas_on_postgresql_deliver_each_event_once_in_order(
    replicas: list[FacadeProcess], receiver: Receiver
) -> None:
    paths = ("/r-full", "/r-ids", "/r-empty")
    contents = ("full-resource", "id-only", "empty")
    with httpx.Client(base_url=replicas[0].base_url, timeout=30, headers=FHIR_JSON) as http:
        for path, content in zip(paths, contents, strict=True):
            active(http, subscription(TASK_TOPIC, receiver.url(path.lstrip("/")), content))

    def lifecycle(n: int) -> None:
        """One Task created and moved through four statuses: five events, each write at the
        next replica in turn."""
        writes = [replicas[(n + k) % len(replicas)].base_url for k in range(len(STATUSES) + 1)]
        with httpx.Client(timeout=30, headers=FHIR_JSON) as http:
            current = ok_json(http.post(f"{writes[0]}/Task", json=task(f"P-R{n}")), 201)
            for base, status in zip(writes[1:], STATUSES, strict=True):
                current = ok_json(
                    http.put(f"{base}/Task/{current['id']}", json={**current, "status": status})
                )

    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lifecycle, range(20)))  # 20 x 5 = 100 events per subscription

    for path in paths:
        wait_for(lambda path=path: len(numbers(receiver, path)) >= 100, 90)  # type: ignore[misc]
    threading.Event().wait(1.0)  # a duplicate would have arrived by now
    for path in paths:
        assert numbers(receiver, path) == list(range(1, 101)), path  # each once, in order
    assert len(set().union(*(senders(receiver, p) for p in paths))) >= 2, "one replica did all the work"


def test_sigkill_mid_stream_then_restart_delivers_every_event(
    tmp_path: Path, orthanc: EmbeddedOrthanc, receiver: Receiver
) -> None:
    database_url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    port = free_port()
    env = process_env(database_url, orthanc, receiver, port)
    facade = FacadeProcess(env, port)
    facade.start()
    path = "/killed"
    try:
        with httpx.Client(base_url=facade.base_url, timeout=30, headers=FHIR_JSON) as http:
            sub = active(http, subscription(TASK_TOPIC, receiver.url(path.lstrip("/")), "id-only"))
            receiver.delay = 0.3  # each notification is held: the kill finds one on the wire
            for n in range(30):
                ok_json(http.post("Task", json=task(f"P-K{n}")), 201)
        wait_for(lambda: len(numbers(receiver, path)) >= 5, 30)
        facade.kill()
    finally:
        facade.stop()
    receiver.delay = 0.0
    before_restart = numbers(receiver, path)
    assert len(before_restart) < 30, "the kill came after everything was delivered"

    # Written while no facade runs: by this process, with the same pre-commit matcher.
    engine = create_store_engine(database_url)
    store = ResourceStore(engine)
    SubscriptionMatcher(topics(), env["FACADE_BASE_URL"]).subscribe_to(store.bus)
    for n in range(10):
        store.create(task(f"P-D{n}"))

    restarted = FacadeProcess(env, port)
    restarted.start()
    try:
        wait_for(lambda: set(numbers(receiver, path)) >= set(range(1, 41)), 60)
        threading.Event().wait(1.0)
    finally:
        restarted.stop()

    received = numbers(receiver, path)
    first_seen = list(dict.fromkeys(received))  # the receiver drops repeats by event number
    assert first_seen == list(range(1, 41))
    assert received == sorted(received), received  # in order, a repeat right after its original
    duplicates = len(received) - len(first_seen)
    assert duplicates <= 1, received  # only the one notification in flight when killed
    with engine.connect() as connection:
        rows = connection.execute(
            select(func.count(), func.count(func.distinct(EVENT.c.event_number))).where(
                EVENT.c.subscription_id == sub
            )
        ).one()
        state = connection.execute(
            select(STATE.c.events_count, STATE.c.delivered_through).where(STATE.c.subscription_id == sub)
        ).one()
    assert tuple(rows) == (40, 40)  # no event number twice in the rows
    assert tuple(state) == (40, 40)
    engine.dispose()
