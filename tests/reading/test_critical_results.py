"""Critical results (ADR 0034): a signed report with a result flagged `AA` sends a Communication
to the order's requester; acknowledged (status completed, or a reply) it is left alone; not
acknowledged within FACADE_READING_CRITICAL_ACK_TIMEOUT it is escalated: a stat Task and an
AuditEvent. A real facade (SQLite store, REST, the escalation loop on short timeouts); no PACS is
needed (the PDF copy to the PACS is off)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from fhir_facade.reading import escalation
from fhir_facade.reading.codes import TASK_CODE_SYSTEM
from fhir_facade.reading.critical import INTERPRETATION
from tests.conftest import ok_json, serve, validate
from tests.facade_process import wait_for

FHIR_JSON = {"Content-Type": "application/fhir+json"}
FOLLOW_UP = f"{TASK_CODE_SYSTEM}|critical-result-follow-up"
ALERT = "http://terminology.hl7.org/CodeSystem/communication-category|alert"
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with (
        serve(
            {
                "reading_pdf_to_pacs": False,
                "reading_critical_ack_timeout": TIMEOUT,
                "reading_critical_check_interval": 0.2,
                "audit_enabled": True,
            }
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as http,
    ):
        yield http


def _order(client: httpx.Client, patient: str) -> dict[str, Any]:
    return ok_json(
        client.post(
            "/ServiceRequest",
            json={
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "code": {"text": "CT head"},
                "subject": {"reference": f"Patient/{patient}"},
                "requester": {"reference": "Practitioner/ward-doctor", "display": "Dr Ward"},
            },
            headers=FHIR_JSON,
        ),
        201,
    )


def _report(order: dict[str, Any], flag: str | None) -> dict[str, Any]:
    finding: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "impression",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "19005-8"}], "text": "Impression"},
        "valueString": "Acute subdural haematoma with midline shift.",
    }
    if flag:
        finding["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}]}]
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}], "text": "CT head report"},
        "subject": order["subject"],
        "basedOn": [{"reference": f"ServiceRequest/{order['id']}"}],
        "resultsInterpreter": [{"reference": "Practitioner/rad-a", "display": "Dr A"}],
        "contained": [finding],
        "result": [{"reference": "#impression"}],
        "conclusion": "Acute subdural haematoma.",
    }


def _communications(client: httpx.Client, patient: str) -> list[dict[str, Any]]:
    bundle = ok_json(client.get("/Communication", params={"patient": patient, "category": ALERT}))
    return [e["resource"] for e in bundle.get("entry", [])]


def _follow_ups(client: httpx.Client, communication_id: str) -> list[dict[str, Any]]:
    params = {"code": FOLLOW_UP, "focus": f"Communication/{communication_id}"}
    return [e["resource"] for e in ok_json(client.get("/Task", params=params)).get("entry", [])]


def _sign(
    client: httpx.Client, patient: str, flag: str | None = "AA"
) -> tuple[dict[str, Any], dict[str, Any]]:
    order = _order(client, patient)
    report = ok_json(client.post("/DiagnosticReport", json=_report(order, flag), headers=FHIR_JSON), 201)
    return order, report


class TestCritical:
    def test_a_report_without_the_flag_sends_nothing(self, client: httpx.Client) -> None:
        _sign(client, "CRIT-0", flag=None)
        assert _communications(client, "CRIT-0") == []

    def test_acknowledged_by_status_is_not_escalated(self, client: httpx.Client) -> None:
        order, report = _sign(client, "CRIT-1")
        (communication,) = _communications(client, "CRIT-1")
        validate(communication)
        assert communication["status"] == "in-progress" and communication["priority"] == "stat"
        assert communication["recipient"] == [order["requester"]]
        assert communication["about"] == [{"reference": f"DiagnosticReport/{report['id']}"}]
        assert communication["payload"][0] == {"contentReference": communication["about"][0]}
        assert communication["sender"] == {"reference": "Practitioner/rad-a", "display": "Dr A"}
        done = {**communication, "status": "completed", "received": communication["sent"]}
        ok_json(client.put(f"/Communication/{communication['id']}", json=done, headers=FHIR_JSON))
        time.sleep(TIMEOUT + 1.0)  # past the timeout and several checks
        assert _follow_ups(client, communication["id"]) == []

    def test_acknowledged_by_a_reply_is_completed_and_not_escalated(self, client: httpx.Client) -> None:
        _sign(client, "CRIT-2")
        (communication,) = _communications(client, "CRIT-2")
        reply = {
            "resourceType": "Communication",
            "status": "completed",
            "inResponseTo": [{"reference": f"Communication/{communication['id']}"}],
            "subject": communication["subject"],
            "sender": communication["recipient"][0],
            "payload": [{"contentString": "Read, patient sent to neurosurgery."}],
        }
        ok_json(client.post("/Communication", json=reply, headers=FHIR_JSON), 201)
        acknowledged = ok_json(client.get(f"/Communication/{communication['id']}"))
        assert acknowledged["status"] == "completed" and "received" in acknowledged
        time.sleep(TIMEOUT + 1.0)
        assert _follow_ups(client, communication["id"]) == []

    def test_unacknowledged_is_escalated_once(self, client: httpx.Client) -> None:
        order, report = _sign(client, "CRIT-3")
        (communication,) = _communications(client, "CRIT-3")
        (task,) = wait_for(lambda: _follow_ups(client, communication["id"]))
        validate(task)
        assert task["priority"] == "stat" and task["status"] == "requested"
        assert task["for"] == {"reference": "Patient/CRIT-3"}
        assert task["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
        assert task["input"][0]["valueReference"] == {"reference": f"DiagnosticReport/{report['id']}"}
        time.sleep(1.0)
        assert len(_follow_ups(client, communication["id"])) == 1, "escalated once"
        still = ok_json(client.get(f"/Communication/{communication['id']}"))
        assert still["status"] == "in-progress", "the recipient may still acknowledge it"

        def audited() -> list[dict[str, Any]]:
            bundle = ok_json(client.get("/AuditEvent", params={"entity": f"Task/{task['id']}"}))
            found = [e["resource"] for e in bundle.get("entry", [])]  # the Task's creation is audited too
            return [a for a in found if a.get("subtype", [{}])[0].get("code") == "critical-result-follow-up"]

        (event,) = wait_for(audited)
        validate(event)
        assert event["subtype"][0]["code"] == "critical-result-follow-up"
        whats = [e["what"]["reference"] for e in event["entity"]]
        assert f"Communication/{communication['id']}" in whats
        assert f"DiagnosticReport/{report['id']}" in whats


def test_escalated_ones_do_not_starve_newer_overdue_ones(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Escalated Communications stay in-progress; a check that read only the first page of overdue
    ones would see the same escalated ones for ever. With pages of 2, five that fall overdue
    together are all escalated."""
    monkeypatch.setattr(escalation, "_BATCH", 2)
    ids = []
    start = datetime.now(UTC)
    for n in range(5):
        sent = (start + timedelta(milliseconds=n)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        communication = {
            "resourceType": "Communication",
            "status": "in-progress",
            "category": [{"coding": [{"system": ALERT.split("|")[0], "code": "alert"}]}],
            "priority": "stat",
            "subject": {"reference": "Patient/CRIT-BACKLOG"},
            "sent": sent,
            "payload": [{"contentString": f"critical result {n}"}],
        }
        ids.append(ok_json(client.post("/Communication", json=communication, headers=FHIR_JSON), 201)["id"])

    for communication_id in ids:
        (task,) = wait_for(lambda cid=communication_id: _follow_ups(client, cid))
        validate(task)
