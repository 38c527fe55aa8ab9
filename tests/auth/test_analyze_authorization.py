"""`$analyze` under SMART: it needs read on the study (within the patient compartment) and create on
DiagnosticReport; the real model runs only for a caller allowed both. Job polling needs read on
DiagnosticReport."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from tests.audit.test_audit_smart import event_of, events_of, is_request_event
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import demo_brain_study

STUDY_UID = "1.2.826.0.1.3680043.8.498.727.9101"
PATIENT = "ANALYZE-AUTH-1"
ALLOWED = "launch/patient patient/ImagingStudy.rs patient/DiagnosticReport.cr"


@pytest.fixture(scope="module")
def analyzing(loaded_orthanc: EmbeddedOrthanc) -> Iterator[tuple[LiveServer, TestIssuer]]:
    datasets = demo_brain_study(STUDY_UID, PATIENT, 4)
    with httpx.Client(timeout=60) as client:
        store_instances(client, loaded_orthanc.url, datasets)
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    settings = {
        **issuer.facade_settings,
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "analyze_enabled": True,
        "analyze_worklist": False,
        "analyze_write_sr": False,
    }
    with serve(settings, port=port) as server:
        yield server, issuer
    issuer.close()


def _post(
    analyzing: tuple[LiveServer, TestIssuer], scope: str, patient: str, **headers: str
) -> httpx.Response:
    server, issuer = analyzing
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        return http.post(
            f"ImagingStudy/{STUDY_UID}/$analyze",
            headers={**issuer.headers(scope, patient=patient), **headers},
        )


def test_another_patients_study_is_404(analyzing: tuple[LiveServer, TestIssuer]) -> None:
    outcome(_post(analyzing, ALLOWED, "P-1001"), 404, "not-found")


def test_without_create_on_diagnostic_report_is_403(analyzing: tuple[LiveServer, TestIssuer]) -> None:
    response = _post(analyzing, "launch/patient patient/ImagingStudy.rs", PATIENT)
    outcome(response, 403, "forbidden")
    assert 'scope="patient/DiagnosticReport.c"' in response.headers["www-authenticate"]


def test_without_read_on_the_study_is_403(analyzing: tuple[LiveServer, TestIssuer]) -> None:
    outcome(_post(analyzing, "launch/patient patient/DiagnosticReport.c", PATIENT), 403, "forbidden")


def test_allowed_caller_gets_the_report(analyzing: tuple[LiveServer, TestIssuer]) -> None:
    report = ok_json(_post(analyzing, ALLOWED, PATIENT))
    assert report["resourceType"] == "DiagnosticReport"
    assert report["subject"]["reference"] == f"Patient/{PATIENT}"


def test_job_polling_needs_read_on_diagnostic_report(analyzing: tuple[LiveServer, TestIssuer]) -> None:
    _, issuer = analyzing
    accepted = _post(analyzing, ALLOWED, PATIENT, Prefer="respond-async")
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.headers["content-location"]
    with httpx.Client(timeout=60) as http:
        refused = http.get(
            status_url, headers=issuer.headers("launch/patient patient/ImagingStudy.rs", patient=PATIENT)
        )
        outcome(refused, 403, "forbidden")
        assert http.get(status_url).status_code == 401
        polled = http.get(status_url, headers=issuer.headers(ALLOWED, patient=PATIENT))
        assert polled.status_code in (200, 202), polled.text


def test_analyze_and_its_refusals_are_audited(analyzing: tuple[LiveServer, TestIssuer]) -> None:
    server, issuer = analyzing
    ok_json(_post(analyzing, ALLOWED, PATIENT, **{"X-Correlation-ID": "analyze-audit-ok"}))
    outcome(
        _post(analyzing, ALLOWED, "P-1001", **{"X-Correlation-ID": "analyze-audit-404"}), 404, "not-found"
    )
    done = event_of(server, issuer, "analyze-audit-ok")
    assert (done["action"], done["subtype"][0]["code"], done["outcome"]) == ("E", "operation", "0")
    assert any(e.get("name") == "$analyze" for e in done["entity"])
    assert {"reference": f"ImagingStudy/{STUDY_UID}"} in [e.get("what") for e in done["entity"]]
    # The result the server wrote for the caller: one event per resource, recorded by the audit stage.
    written = [e for e in events_of(server, issuer, "analyze-audit-ok") if not is_request_event(e)]
    assert {
        w["what"]["reference"].split("/")[0]
        for e in written
        for w in e.get("entity", [])
        if "reference" in w.get("what", {})
    } >= {
        "DiagnosticReport",
        "Observation",
        "Provenance",
    }
    assert all("(internal)" in e["outcomeDesc"] and e["outcome"] == "0" for e in written)
    refused = event_of(server, issuer, "analyze-audit-404")
    assert refused["outcome"] == "4"
    assert {"reference": "Patient/P-1001"} in [e.get("what") for e in refused["entity"]], (
        "the patient in context"
    )
