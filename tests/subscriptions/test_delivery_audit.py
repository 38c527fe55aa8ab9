"""Every notification attempt is an AuditEvent (fhir_facade/audit/notification.py): DCM 110106
Export by the server to the receiver, outcome 0 for a 2xx, 4 when the receiver refused, 8 when
nothing answered; entities the Subscription (with the event number) and the focus. Under SMART
(where the audit is on by default) only a caller allowed to read AuditEvents sees them. A real
facade, a real receiver, a closed port for the unanswered case; every AuditEvent validated as R4B."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, serve, validate
from tests.subscriptions.receiver import Receiver
from tests.subscriptions.test_rest_hook import FHIR_JSON, TASK_TOPIC, subscription, task

CLOSED = "http://127.0.0.1:9/closed"
SUBSCRIBER = "user/Subscription.cruds user/Task.cruds"
AUDITOR = "user/AuditEvent.rs"


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def issuer(port: int) -> Iterator[TestIssuer]:
    test_issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    yield test_issuer
    test_issuer.close()


@pytest.fixture(scope="module")
def secured(
    orthanc: EmbeddedOrthanc, issuer: TestIssuer, receiver: Receiver, port: int
) -> Iterator[LiveServer]:
    with serve(
        {
            **issuer.facade_settings,
            "audit_enabled": None,  # the default: on with SMART
            "dicomweb_url": orthanc.dicomweb_url,
            "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/", CLOSED],
            "subscription_poll_interval": 0.05,
            "subscription_retry_seconds": 0.2,
        },
        port=port,
    ) as server:
        assert server.app.state.settings.audits
        yield server


def exports(server: LiveServer, issuer: TestIssuer, subscription_id: str, count: int) -> list[dict[str, Any]]:
    """The Export AuditEvents about `subscription_id`, oldest first, once there are `count`."""
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=server.base_url, timeout=30, headers=issuer.headers(AUDITOR)) as fhir:
        while True:
            bundle = ok_json(fhir.get("AuditEvent", params={"_count": "500"}))
            found = [
                e["resource"]
                for e in bundle.get("entry", [])
                if e["resource"]["type"]["code"] == "110106"
                and e["resource"]["entity"][0]["what"]["reference"] == f"Subscription/{subscription_id}"
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return sorted(found, key=lambda e: e["period"]["start"])
            time.sleep(0.2)


def test_each_attempt_is_an_export_audit_event_visible_to_auditors_only(
    secured: LiveServer, issuer: TestIssuer, receiver: Receiver
) -> None:
    headers = {**FHIR_JSON, **issuer.headers(SUBSCRIBER)}
    with httpx.Client(base_url=secured.base_url, timeout=30, headers=headers) as http:
        created = ok_json(
            http.post(
                "Subscription", json=subscription(TASK_TOPIC, receiver.url("audited"), "full-resource")
            ),
            201,
        )
        sub = created["id"]
        deadline = time.monotonic() + 15
        while ok_json(http.get(f"Subscription/{sub}"))["status"] != "active":
            assert time.monotonic() < deadline, "never became active"
            time.sleep(0.05)
        receiver.fail_paths.add("/audited")  # the first attempt is refused (500) ...
        stored = ok_json(http.post("Task", json=task("P-AUD")), 201)
        receiver.wait_for(lambda: len(receiver.bundles("/audited")) >= 2)  # handshake + refused try
        receiver.fail_paths.discard("/audited")  # ... the retry is taken
        receiver.wait_for(lambda: len(receiver.bundles("/audited")) >= 3)
        unanswered = ok_json(http.post("Subscription", json=subscription(TASK_TOPIC, CLOSED)), 201)

        # The subscriber's token holds no AuditEvent scope: the audit is not its to read.
        assert http.get("AuditEvent").status_code == 403

    handshake, refused, delivered = exports(secured, issuer, sub, 3)[:3]
    for event in (handshake, refused, delivered):
        validate(event)
        assert event["action"] == "R"
        server, destination = event["agent"]
        assert server["requestor"] is True and server["who"]["display"].startswith("fhir-facade")
        assert destination["requestor"] is False
        assert destination["who"]["display"] == receiver.url("audited")
        assert destination["network"] == {"address": "127.0.0.1", "type": "2"}
    assert [e["subtype"][0]["code"] for e in (handshake, refused, delivered)] == [
        "handshake",
        "event-notification",
        "event-notification",
    ]
    assert [e["outcome"] for e in (handshake, refused, delivered)] == ["0", "4", "0"]
    assert "HTTP 500" in refused["outcomeDesc"]
    subscription_entity, focus, patient = delivered["entity"]
    assert subscription_entity["detail"] == [{"type": "event-number", "valueString": "1"}]
    assert focus["what"]["reference"] == f"Task/{stored['id']}/_history/1"
    assert patient["what"]["reference"] == "Patient/P-AUD"
    assert refused["entity"][1]["what"] == focus["what"]
    assert len(handshake["entity"]) == 1  # a handshake is about no resource

    (never,) = exports(secured, issuer, unanswered["id"], 1)[:1]
    validate(never)
    assert never["outcome"] == "8"  # nothing answered
    assert never["agent"][1]["who"]["display"] == CLOSED
