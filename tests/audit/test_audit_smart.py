"""Auditing under SMART on FHIR (FACADE_AUTH=smart, where it is on by default): the caller comes
from the validated token, refusals (401 without a token, 403 without a scope) are recorded, and
the DICOMweb proxy is audited with the DICOM event types."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.audit.event import CLIENT_ID_SYSTEM
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.audit.conftest import audited, correlation_of, query_of
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, outcome, validate
from tests.dicom_factory import CORPUS

STUDY = CORPUS["mueller_mr_brain"]
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
def secured(loaded_orthanc: EmbeddedOrthanc, issuer: TestIssuer, port: int) -> Iterator[LiveServer]:
    overrides = {
        **issuer.facade_settings,
        "audit_enabled": None,  # the default: on with SMART
        "dicomweb_url": loaded_orthanc.dicomweb_url,
    }
    with audited(overrides, port=port) as server:
        assert server.app.state.settings.audits
        yield server


def events_of(server: LiveServer, issuer: TestIssuer, correlation: str) -> list[dict[str, Any]]:
    """Every AuditEvent with this correlation id (once one is there), read with an auditor's token."""
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=server.base_url, timeout=30, headers=issuer.headers(AUDITOR)) as fhir:
        while True:
            bundle = fhir.get("/AuditEvent", params={"_count": "500"}).json()
            found = [
                e["resource"] for e in bundle.get("entry", []) if correlation_of(e["resource"]) == correlation
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def is_request_event(event: dict[str, Any]) -> bool:
    """Recorded by the middleware for the request itself, not by the audit stage for an interaction
    the request or the server made (those say their origin: "(internal)", "(bundle-entry)"...)."""
    return not re.search(r" \((internal|operation|bundle-entry)\):", event.get("outcomeDesc", ""))


def event_of(server: LiveServer, issuer: TestIssuer, correlation: str) -> dict[str, Any]:
    """The one AuditEvent of a request itself, read with an auditor's token."""
    found = [e for e in events_of(server, issuer, correlation) if is_request_event(e)]
    assert len(found) == 1, found
    validate(found[0])
    return found[0]


def test_a_request_without_a_token_is_recorded(secured: LiveServer, issuer: TestIssuer) -> None:
    response = httpx.get(
        f"{secured.base_url}/Observation", headers={"X-Correlation-ID": "smart-401"}, timeout=30
    )
    outcome(response, 401, "login")
    event = event_of(secured, issuer, "smart-401")
    assert event["outcome"] == "4"
    (agent,) = event["agent"]
    assert agent["name"] == "unauthenticated (no valid access token)"
    assert agent["network"]["address"] == "127.0.0.1"


def test_the_caller_comes_from_the_token(secured: LiveServer, issuer: TestIssuer) -> None:
    token = issuer.headers(
        "patient/Observation.rs", patient=STUDY.patient_id, fhirUser=f"Patient/{STUDY.patient_id}"
    )
    response = httpx.get(
        f"{secured.base_url}/Observation",
        params={"code": "18748-4"},
        headers={**token, "X-Correlation-ID": "smart-200"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    event = event_of(secured, issuer, "smart-200")
    assert event["outcome"] == "0"
    client, user = event["agent"]
    assert client["who"]["identifier"] == {"system": CLIENT_ID_SYSTEM, "value": "test-app"}
    assert user["who"] == {"reference": f"Patient/{STUDY.patient_id}"}
    assert user["altId"] == "user-1"
    references = [e["what"]["reference"] for e in event["entity"] if "reference" in e.get("what", {})]
    assert references == [f"Patient/{STUDY.patient_id}"], "the patient in context"


def test_a_refusal_for_want_of_scope_is_recorded_with_the_caller(
    secured: LiveServer, issuer: TestIssuer
) -> None:
    response = httpx.get(
        f"{secured.base_url}/Task",
        headers={**issuer.headers("user/Observation.rs"), "X-Correlation-ID": "smart-403"},
        timeout=30,
    )
    outcome(response, 403, "forbidden")
    event = event_of(secured, issuer, "smart-403")
    assert event["outcome"] == "4"
    assert event["outcomeDesc"] == "GET /fhir/Task: 403 Forbidden"
    assert event["agent"][0]["who"]["identifier"]["value"] == "test-app"


def test_the_dicomweb_proxy_is_audited(secured: LiveServer, issuer: TestIssuer) -> None:
    root = secured.base_url.removesuffix("/fhir")
    headers = {"Accept": "application/dicom+json", **issuer.headers("user/ImagingStudy.rs")}
    query = httpx.get(
        f"{root}/dicom-web/studies",
        params={"PatientID": STUDY.patient_id},
        headers={**headers, "X-Correlation-ID": "qido"},
        timeout=30,
    )
    assert query.status_code == 200, query.text
    event = event_of(secured, issuer, "qido")
    assert (event["type"]["code"], event["action"], event["outcome"]) == ("110112", "E", "0")
    assert query_of(event) == f"studies?PatientID={STUDY.patient_id}"

    metadata = httpx.get(
        f"{root}/dicom-web/studies/{STUDY.study_uid}/metadata",
        headers={**headers, "X-Correlation-ID": "wado"},
        timeout=30,
    )
    assert metadata.status_code == 200
    event = event_of(secured, issuer, "wado")
    assert (event["type"]["code"], event["action"]) == ("110106", "R")
    study = next(e for e in event["entity"] if e.get("what", {}).get("identifier", {}).get("system"))
    assert study["what"]["identifier"]["value"] == f"urn:oid:{STUDY.study_uid}"
