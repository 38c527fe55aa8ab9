"""The ServiceRequest topic with its real trigger: imaging orders written through the REST API (the
worklist turns them into DICOM worklist items in a real Orthanc), then revoked or completed; a real
receiver gets one notification per creation and status change, and each subscription's filters
(`patient`, `status`, `code`) select its events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import LiveServer, ok_json
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TOPICS, _events, subscription
from tests.worklist.conftest import facade_with_worklist_folder
from tests.worklist.test_orders_to_worklist import new_order

ORDER_TOPIC = f"{TOPICS}/service-request-status"


@pytest.fixture(scope="module")
def facade(
    tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[tuple[LiveServer, EmbeddedOrthanc]]:
    with facade_with_worklist_folder(
        tmp_path_factory,
        "order-topic",
        subscription_endpoints=[f"http://127.0.0.1:{receiver.port}/"],
        subscription_poll_interval=0.05,
    ) as (server, orthanc, _):
        yield server, orthanc


def _subscribe(
    http: httpx.Client, receiver: Receiver, path: str, *filters: str, content: str = "id-only"
) -> str:
    created = ok_json(
        http.post("Subscription", json=subscription(ORDER_TOPIC, receiver.url(path), content, filters)), 201
    )
    deadline = time.monotonic() + 10
    while ok_json(http.get(f"Subscription/{created['id']}"))["status"] != "active":
        assert time.monotonic() < deadline, "never became active"
        time.sleep(0.05)
    return str(created["id"])


def _foci(receiver: Receiver, path: str) -> list[str]:
    """The focus references of the events received at `path`, in event-number order."""
    events = sorted(
        (int(e["event-number"]), e["focus"]["reference"])
        for _, bundle in _events(receiver, path)
        for e in status_of(bundle)["events"]
    )
    return [reference for _, reference in dict(events).items()]


def test_orders_created_and_changed_notify_through_their_filters(
    facade: tuple[LiveServer, EmbeddedOrthanc], receiver: Receiver
) -> None:
    server, _ = facade
    with httpx.Client(base_url=server.base_url + "/", timeout=30, headers=FHIR_JSON) as http:
        every = _subscribe(http, receiver, "orders-all", content="full-resource")
        _subscribe(http, receiver, "orders-revoked", "ServiceRequest?status=revoked")
        _subscribe(http, receiver, "orders-ct", "ServiceRequest?code=CT")
        _subscribe(http, receiver, "orders-patient", "ServiceRequest?patient=Patient/PID-ACC-TOPIC-1")

        mr = ok_json(http.post("ServiceRequest", json=new_order("ACC-TOPIC-1")), 201)
        ct = ok_json(http.post("ServiceRequest", json=new_order("ACC-TOPIC-2", "CT")), 201)
        # Not a status change: no event for any subscription.
        ok_json(http.put(f"ServiceRequest/{mr['id']}", json={**mr, "priority": "urgent"}))
        ok_json(http.put(f"ServiceRequest/{mr['id']}", json={**mr, "status": "revoked"}))
        ok_json(http.put(f"ServiceRequest/{ct['id']}", json={**ct, "status": "completed"}))

        receiver.wait_for(lambda: len(_foci(receiver, "/orders-all")) == 4)
        time.sleep(0.5)  # anything wrongly matched would have arrived by now

        base = f"{server.base_url}/ServiceRequest"
        assert _foci(receiver, "/orders-all") == [
            f"{base}/{mr['id']}/_history/1",
            f"{base}/{ct['id']}/_history/1",
            f"{base}/{mr['id']}/_history/3",
            f"{base}/{ct['id']}/_history/2",
        ]
        assert _foci(receiver, "/orders-revoked") == [f"{base}/{mr['id']}/_history/3"]
        assert _foci(receiver, "/orders-ct") == [
            f"{base}/{ct['id']}/_history/1",
            f"{base}/{ct['id']}/_history/2",
        ]
        assert _foci(receiver, "/orders-patient") == [
            f"{base}/{mr['id']}/_history/1",
            f"{base}/{mr['id']}/_history/3",
        ]
        # full-resource: the version as it was when the event happened, statuses in order.
        statuses: dict[int, Any] = {}
        for _, bundle in _events(receiver, "/orders-all"):
            for event, entry in zip(status_of(bundle)["events"], bundle["entry"][1:], strict=True):
                statuses[int(event["event-number"])] = (entry["resource"]["id"], entry["resource"]["status"])
        assert [statuses[n] for n in sorted(statuses)] == [
            (mr["id"], "active"),
            (ct["id"], "active"),
            (mr["id"], "revoked"),
            (ct["id"], "completed"),
        ]
        counters = ok_json(http.get(f"Subscription/{every}/$status"))
        assert status_of({"entry": counters["entry"]})["events-since-subscription-start"] == "4"
