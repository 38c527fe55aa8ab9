"""Retention of event rows (FACADE_SUBSCRIPTION_EVENT_RETENTION): the worker purges rows older than
the window that reached their receiver, never undelivered ones; `$events` then answers with the
events still kept (the available range only), while `events-since-subscription-start` still counts
every event. A real facade (SQLite) and a real receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.subscriptions.tables import EVENT
from tests.conftest import LiveServer, ok_json, serve
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TASK_TOPIC, _active, _events, subscription, task

RETENTION = 1.0


@pytest.fixture(scope="module")
def facade(orthanc: EmbeddedOrthanc, receiver: Receiver) -> Iterator[LiveServer]:
    with serve(
        {
            "dicomweb_url": orthanc.dicomweb_url,
            "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
            "subscription_poll_interval": 0.05,
            "subscription_retry_seconds": 0.2,
            "subscription_max_failures": 100,
            "subscription_event_retention": RETENTION,
        }
    ) as server:
        yield server


def kept(server: LiveServer, subscription_id: str) -> list[int]:
    with server.app.state.store.engine.connect() as connection:
        rows = connection.execute(
            select(EVENT.c.event_number)
            .where(EVENT.c.subscription_id == subscription_id)
            .order_by(EVENT.c.event_number)
        ).scalars()
        return [int(n) for n in rows]


def replayed(http: httpx.Client, subscription_id: str, **params: str) -> dict[str, object]:
    return status_of(ok_json(http.get(f"Subscription/{subscription_id}/$events", params=params)))


def test_delivered_rows_past_the_window_are_purged_undelivered_ones_kept(
    facade: LiveServer, receiver: Receiver
) -> None:
    with httpx.Client(base_url=facade.base_url, timeout=30, headers=FHIR_JSON) as http:
        sub = _active(http, receiver, subscription(TASK_TOPIC, receiver.url("kept"), "id-only"), "/kept")
        stuck = _active(http, receiver, subscription(TASK_TOPIC, receiver.url("stuck"), "id-only"), "/stuck")
        receiver.fail_paths.add("/stuck")  # this receiver refuses everything: nothing is delivered
        for n in range(3):
            ok_json(http.post("Task", json=task(f"P-RET{n}")), 201)
        receiver.wait_for(lambda: len(_events(receiver, "/kept")) == 3)
        assert kept(facade, sub) == [1, 2, 3]
        assert replayed(http, sub, eventsSinceNumber="1")["events"]  # type: ignore[truthy-bool]

        deadline = time.monotonic() + 10
        while kept(facade, sub):
            assert time.monotonic() < deadline, "delivered rows were never purged"
            time.sleep(0.1)
        assert kept(facade, stuck) == [1, 2, 3]  # older than the window, but never delivered

        purged = replayed(http, sub, eventsSinceNumber="1", eventsUntilNumber="3")
        assert "events" not in purged  # none of 1..3 is kept: no notification-event at all
        assert purged["events-since-subscription-start"] == "3"
        assert purged["type"] == "query-event"

        ok_json(http.post("Task", json=task("P-RET4")), 201)
        receiver.wait_for(lambda: len(_events(receiver, "/kept")) == 4)
        available = replayed(http, sub, eventsSinceNumber="1")
        assert [e["event-number"] for e in available["events"]] == ["4"]  # type: ignore[index]
        assert available["events-since-subscription-start"] == "4"
        receiver.fail_paths.discard("/stuck")
