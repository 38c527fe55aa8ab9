"""The DiagnosticReport topic with its real triggers: the real `$analyze` (the shipped ONNX model on
real Colin27 MR slices in a real Orthanc) writes the preliminary AI report, then a radiologist's
signed (final) report is written through the REST API; a real receiver gets one notification per
report, and each subscription's filters (`status`, `patient`, `code`) select its events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from tests.conftest import LiveServer, ok_json, serve
from tests.dicom_factory import demo_brain_study
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TOPICS, _events, subscription

REPORT_TOPIC = f"{TOPICS}/diagnostic-report-status"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1414.1"
PATIENT_ID = "SUBS-REPORT-1"


@pytest.fixture(scope="module")
def facade(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[LiveServer]:
    with (
        EmbeddedOrthanc(
            tmp_path_factory.mktemp("orthanc-report-topic"),
            http_port=free_port(),
            dicom_port=free_port(),
            http_auth=False,  # loopback only
        ) as orthanc,
        serve(
            {
                "dicomweb_url": orthanc.dicomweb_url,
                "orthanc_url": orthanc.url,
                "analyze_enabled": True,
                "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
                "subscription_poll_interval": 0.05,
            }
        ) as server,
    ):
        with httpx.Client(timeout=60) as http:
            store_instances(http, orthanc.url, demo_brain_study(STUDY_UID, PATIENT_ID, 8))
        yield server


def _subscribe(http: httpx.Client, receiver: Receiver, path: str, *filters: str, content: str) -> None:
    created = ok_json(
        http.post("Subscription", json=subscription(REPORT_TOPIC, receiver.url(path), content, filters)), 201
    )
    deadline = time.monotonic() + 15
    while ok_json(http.get(f"Subscription/{created['id']}"))["status"] != "active":
        assert time.monotonic() < deadline, "never became active"
        time.sleep(0.05)


def _focus_statuses(receiver: Receiver, path: str) -> list[tuple[str, str | None]]:
    """(focus as Type/id, status of the full resource if sent) per event, in event-number order."""
    found: dict[int, tuple[str, str | None]] = {}
    for number, bundle in _events(receiver, path):
        (event,) = [e for e in status_of(bundle)["events"] if int(e["event-number"]) == number]
        resources = [e["resource"] for e in bundle["entry"][1:] if "resource" in e]
        # The focus names the version: <base>/DiagnosticReport/<id>/_history/<n>.
        focus = "/".join(event["focus"]["reference"].split("/_history/")[0].split("/")[-2:])
        found[number] = (focus, resources[0]["status"] if resources else None)
    assert sorted(found) == list(range(1, len(found) + 1)), "event numbers without gaps"
    return [found[n] for n in sorted(found)]


def test_the_ai_report_and_the_signed_report_notify_through_their_filters(
    facade: LiveServer, receiver: Receiver
) -> None:
    with httpx.Client(base_url=facade.base_url + "/", timeout=120, headers=FHIR_JSON) as http:
        _subscribe(http, receiver, "reports-all", content="full-resource")
        _subscribe(http, receiver, "reports-final", "DiagnosticReport?status=final", content="id-only")
        _subscribe(
            http,
            receiver,
            "reports-patient",
            f"DiagnosticReport?patient=Patient/{PATIENT_ID}",
            content="empty",
        )
        _subscribe(
            http, receiver, "reports-other", "DiagnosticReport?patient=Patient/nobody", content="id-only"
        )

        ai = ok_json(http.post(f"ImagingStudy/{STUDY_UID}/$analyze"))
        assert ai["status"] == "preliminary"
        ai_ref = f"DiagnosticReport/{ai['id']}"
        receiver.wait_for(lambda: len(_focus_statuses(receiver, "/reports-all")) >= 1, timeout=30)
        assert _focus_statuses(receiver, "/reports-all") == [(ai_ref, "preliminary")]

        signed: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": ai["code"],
            "subject": ai["subject"],
            "imagingStudy": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
            "resultsInterpreter": [{"reference": "Practitioner/radiologist-1"}],
            "conclusion": "No intracranial mass.",
        }
        final = ok_json(http.post("DiagnosticReport", json=signed), 201)
        final_ref = f"DiagnosticReport/{final['id']}"
        receiver.wait_for(lambda: len(_focus_statuses(receiver, "/reports-all")) >= 2, timeout=30)
        receiver.wait_for(lambda: len(_events(receiver, "/reports-patient")) >= 2, timeout=30)
        time.sleep(0.5)  # anything wrongly matched would have arrived by now

    assert _focus_statuses(receiver, "/reports-all") == [(ai_ref, "preliminary"), (final_ref, "final")]
    assert _focus_statuses(receiver, "/reports-final") == [(final_ref, None)]
    # `empty` content: the event is there, numbered, with no focus.
    patient_events = [e for _, b in _events(receiver, "/reports-patient") for e in status_of(b)["events"]]
    assert sorted(int(e["event-number"]) for e in patient_events) == [1, 2]
    assert all("focus" not in e for e in patient_events)
    assert _events(receiver, "/reports-other") == []
