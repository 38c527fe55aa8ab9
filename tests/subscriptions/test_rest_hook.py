"""Topic-based Subscriptions end to end (docs/adr/0026-subscriptions-design.md): a real facade
(uvicorn, SQLite store, real Orthanc) notifies a real HTTP receiver on a loopback port. Every
notification is validated as FHIR R4B (Bundle and the SubscriptionStatus Parameters)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.fhir.pipeline import VersionStored
from fhir_facade.store.schema import OutboxEntry
from fhir_facade.store.transactions import write_connection
from fhir_facade.sync.outbox_queue import OutboxQueue
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.subscriptions.receiver import Receiver, status_of

FHIR_JSON = {"Content-Type": "application/fhir+json"}
TOPICS = "http://fhir-facade.org/fhir/SubscriptionTopic"
TASK_TOPIC = f"{TOPICS}/task-status"
REPORT_TOPIC = f"{TOPICS}/diagnostic-report-status"
IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


def subscription(
    topic: str, endpoint: str, content: str = "id-only", filters: tuple[str, ...] = (), **channel: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": topic,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": f"{IG}/backport-payload-content", "valueCode": content}]},
            **channel,
        },
    }
    if filters:
        resource["_criteria"] = {
            "extension": [{"url": f"{IG}/backport-filter-criteria", "valueString": f} for f in filters]
        }
    return resource


def task(patient: str, status: str = "requested", code: str = "read") -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "code": {"coding": [{"system": "http://example.org/task", "code": code}]},
        "for": {"reference": f"Patient/{patient}"},
    }


def report(patient: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


@pytest.fixture(scope="module")
def facade(orthanc: EmbeddedOrthanc, receiver: Receiver) -> Iterator[LiveServer]:
    with serve(
        {
            "dicomweb_url": orthanc.dicomweb_url,
            "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
            "subscription_retry_seconds": 0.2,
            "subscription_max_failures": 2,
            "subscription_poll_interval": 0.05,
        }
    ) as server:
        yield server


@pytest.fixture
def http(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=facade.base_url, timeout=30, headers=FHIR_JSON) as client:
        yield client


def _active(http: httpx.Client, receiver: Receiver, body: dict[str, Any], path: str) -> str:
    """Create the subscription; wait for its handshake and for the server to make it active."""
    created = ok_json(http.post("Subscription", json=body), 201)
    assert created["status"] == "requested"
    receiver.wait_for(lambda: any(status_of(b)["type"] == "handshake" for b in receiver.bundles(path)))
    deadline = time.monotonic() + 10
    while ok_json(http.get(f"Subscription/{created['id']}"))["status"] != "active":
        assert time.monotonic() < deadline, "never became active"
        time.sleep(0.05)
    return str(created["id"])


def _events(receiver: Receiver, path: str) -> list[tuple[int, dict[str, Any]]]:
    """(event number, bundle) of every event notification received at `path`, each validated."""
    found = []
    for bundle in receiver.bundles(path):
        validate(bundle)
        status = status_of(bundle)
        assert bundle["type"] == "history"
        assert bundle["entry"][0]["resource"]["resourceType"] == "Parameters"
        for event in status.get("events", []):
            found.append((int(event["event-number"]), bundle))
    return found


def test_notifications_are_numbered_filtered_and_shaped_by_payload_content(
    http: httpx.Client, receiver: Receiver
) -> None:
    full = _active(http, receiver, subscription(TASK_TOPIC, receiver.url("tasks"), "full-resource"), "/tasks")
    finals = _active(
        http,
        receiver,
        subscription(REPORT_TOPIC, receiver.url("finals"), "id-only", ("DiagnosticReport?status=final",)),
        "/finals",
    )
    empty = _active(
        http,
        receiver,
        subscription(TASK_TOPIC, receiver.url("empty"), "empty", ("Task?code=http://example.org/task|sign",)),
        "/empty",
    )

    created = ok_json(http.post("Task", json=task("P-1")), 201)
    moved = ok_json(http.put(f"Task/{created['id']}", json={**created, "status": "in-progress"}))
    ok_json(http.put(f"Task/{created['id']}", json={**moved, "description": "same status: no event"}))
    signing = ok_json(http.post("Task", json=task("P-1", code="sign")), 201)
    preliminary = ok_json(http.post("DiagnosticReport", json=report("P-1", "preliminary")), 201)
    final = ok_json(
        http.put(f"DiagnosticReport/{preliminary['id']}", json={**preliminary, "status": "final"})
    )

    receiver.wait_for(lambda: len(_events(receiver, "/tasks")) == 3)
    receiver.wait_for(
        lambda: len(_events(receiver, "/finals")) == 1 and len(_events(receiver, "/empty")) == 1
    )
    time.sleep(0.5)  # nothing else arrives (the note-only update, the preliminary report)

    tasks = _events(receiver, "/tasks")
    assert [n for n, _ in tasks] == [1, 2, 3]
    statuses = [b["entry"][1]["resource"]["status"] for _, b in tasks]
    assert statuses == ["requested", "in-progress", "requested"]
    assert [b["entry"][1]["resource"]["id"] for _, b in tasks] == [
        created["id"],
        created["id"],
        signing["id"],
    ]
    first = status_of(tasks[0][1])
    assert first["type"] == "event-notification" and first["topic"] == TASK_TOPIC
    assert first["subscription"]["reference"].endswith(f"Subscription/{full}")
    assert first["events"][0]["focus"]["reference"].endswith(f"Task/{created['id']}/_history/1")

    ((number, only),) = _events(receiver, "/finals")
    assert number == 1
    assert "resource" not in only["entry"][1]  # id-only: the reference, not the report
    assert only["entry"][1]["fullUrl"].endswith(f"DiagnosticReport/{final['id']}")
    assert status_of(only)["events"][0]["focus"]["reference"].endswith(
        f"/_history/{final['meta']['versionId']}"
    )

    ((number, bare),) = _events(receiver, "/empty")
    assert number == 1 and len(bare["entry"]) == 1  # empty: the status only
    assert "focus" not in status_of(bare)["events"][0]
    assert {finals, empty} and full


def test_a_receiver_that_was_down_gets_every_missed_event_in_order_and_events_replays(
    http: httpx.Client, receiver: Receiver
) -> None:
    sub = _active(http, receiver, subscription(TASK_TOPIC, receiver.url("flaky"), "id-only"), "/flaky")
    first = ok_json(http.post("Task", json=task("P-2")), 201)
    receiver.wait_for(lambda: len(_events(receiver, "/flaky")) == 1)

    receiver.stop()
    current = first
    for status in ("received", "accepted", "in-progress"):
        current = ok_json(http.put(f"Task/{first['id']}", json={**current, "status": status}))
    deadline = time.monotonic() + 15
    while ok_json(http.get(f"Subscription/{sub}"))["status"] != "error":  # after 2 failures in a row
        assert time.monotonic() < deadline, "never went to error"
        time.sleep(0.1)

    receiver.start()
    receiver.wait_for(lambda: len(_events(receiver, "/flaky")) == 4, timeout=30)
    assert [n for n, _ in _events(receiver, "/flaky")] == [1, 2, 3, 4]
    deadline = time.monotonic() + 10
    while ok_json(http.get(f"Subscription/{sub}"))["status"] != "active":  # recovered
        assert time.monotonic() < deadline, "never recovered"
        time.sleep(0.1)

    replay = ok_json(
        http.get(f"Subscription/{sub}/$events", params={"eventsSinceNumber": "2", "eventsUntilNumber": "3"})
    )
    assert replay["type"] == "history"
    replayed = status_of(replay)
    assert replayed["type"] == "query-event"
    assert [e["event-number"] for e in replayed["events"]] == ["2", "3"]
    assert replayed["events-since-subscription-start"] == "4"
    everything = status_of(
        ok_json(http.get(f"Subscription/{sub}/$events", params={"content": "full-resource"}))
    )
    assert [e["event-number"] for e in everything["events"]] == ["1", "2", "3", "4"]

    state = ok_json(http.get(f"Subscription/{sub}/$status"))
    assert state["type"] == "searchset"
    parameters = status_of({"entry": state["entry"]})
    assert parameters["type"] == "query-status" and parameters["events-since-subscription-start"] == "4"
    assert parameters["status"] == "active"
    outcome(http.get(f"Subscription/{sub}/$events", params={"eventsSinceNumber": "x"}), 400, "invalid")


def test_the_shape_and_the_endpoint_are_checked(http: httpx.Client, receiver: Receiver) -> None:
    def refused(body: dict[str, Any], detail: str) -> dict[str, Any]:
        found = outcome(
            http.post("Subscription", json=body),
            422,
            "invalid" if detail == "subscription_invalid" else "business-rule",
        )
        assert found["issue"][0]["details"]["coding"][0]["code"] == detail
        return found

    refused(subscription(f"{TOPICS}/no-such-topic", receiver.url()), "subscription_invalid")
    refused(subscription(TASK_TOPIC, "https://attacker.example/steal"), "subscription_endpoint_refused")
    refused(
        subscription(TASK_TOPIC, f"http://127.0.0.1:{receiver.port + 1}/"), "subscription_endpoint_refused"
    )
    email = subscription(TASK_TOPIC, receiver.url())
    email["channel"]["type"] = "email"  # rest-hook and websocket only (websocket: test_websocket.py)
    refused(email, "subscription_invalid")
    refused(subscription(TASK_TOPIC, receiver.url(), "everything"), "subscription_invalid")
    refused(subscription(TASK_TOPIC, receiver.url(), filters=("Task?focus=x",)), "subscription_invalid")
    refused(
        subscription(TASK_TOPIC, receiver.url(), filters=("DiagnosticReport?status=final",)),
        "subscription_invalid",
    )

    # A client cannot make its subscription active: the handshake does.
    created = ok_json(
        http.post("Subscription", json={**subscription(TASK_TOPIC, receiver.url("x")), "status": "active"}),
        201,
    )
    assert created["status"] == "requested"
    body = {**ok_json(http.get(f"Subscription/{created['id']}")), "status": "error"}
    found = outcome(http.put(f"Subscription/{created['id']}", json=body), 422, "business-rule")
    assert found["issue"][0]["expression"] == ["Subscription.status"]


def test_topics_are_advertised_and_subscriptions_are_not_synced(
    http: httpx.Client, facade: LiveServer
) -> None:
    statement = ok_json(http.get("metadata"))
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription"]
    canonicals = {e["valueCanonical"] for e in entry["extension"]}
    assert canonicals == {
        TASK_TOPIC,
        REPORT_TOPIC,
        f"{TOPICS}/imaging-study-available",
        f"{TOPICS}/service-request-status",
    }
    assert {e["url"] for e in entry["extension"]} == {
        "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
    }
    assert {o["name"] for o in entry["operation"]} == {"status", "events", "get-ws-binding-token"}

    engine = facade.app.state.store.engine
    table = OutboxEntry.__table__  # type: ignore[attr-defined]
    from datetime import UTC, datetime

    with write_connection(engine) as connection, connection.begin():
        before = connection.execute(select(func.count()).select_from(table)).scalar_one()
        OutboxQueue.record(connection, VersionStored("Subscription", "s1", 1, False, {}, datetime.now(UTC)))
        OutboxQueue.record(connection, VersionStored("Task", "t1", 1, False, {}, datetime.now(UTC)))
        after = connection.execute(select(func.count()).select_from(table)).scalar_one()
        connection.rollback()
    assert after - before == 1  # the Task's row; none for the Subscription


def test_the_shipped_topics_are_valid_r4b_subscription_topics() -> None:
    from fhir_facade.subscriptions.topics import topics

    shipped = topics()
    assert {
        TASK_TOPIC,
        REPORT_TOPIC,
        f"{TOPICS}/imaging-study-available",
        f"{TOPICS}/service-request-status",
    } == set(shipped)
    for topic in shipped.values():
        validate(topic.resource)
