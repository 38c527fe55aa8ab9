"""Holes found by the security review of the SMART work, each proven over real HTTP against a
FACADE_AUTH=smart facade: a `patient/` token for P-1001 must see and change nothing of JP-0042's,
nothing outside its own compartment, and malformed requests are 4xx OperationOutcomes, not 500s."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from fhir_facade.watcher.arrival_tasks import ANALYZE_CODE
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import demo_brain_study

FHIR_JSON = {"Content-Type": "application/fhir+json"}
OWN, OTHER = "P-1001", "JP-0042"
PATIENT_SCOPES = "launch/patient patient/*.cruds"


def _own(issuer: TestIssuer, scope: str = PATIENT_SCOPES) -> dict[str, str]:
    return {**FHIR_JSON, **issuer.headers(scope, patient=OWN)}


def _admin(issuer: TestIssuer) -> dict[str, str]:
    return {**FHIR_JSON, **issuer.headers("system/*.cruds")}


def _observation(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "review finding"},
        "subject": {"reference": f"Patient/{patient}"},
    }


# -- history ---------------------------------------------------------------------------------------


def test_history_of_another_patients_deleted_resource_is_not_found(
    client: httpx.Client, issuer: TestIssuer
) -> None:
    """The instance history checked only the current version, and a deleted resource has none: every
    earlier version of another patient's deleted resource was served."""
    other_id = ok_json(client.post("Observation", json=_observation(OTHER), headers=_admin(issuer)), 201)[
        "id"
    ]
    assert client.delete(f"Observation/{other_id}", headers=_admin(issuer)).status_code == 204
    outcome(client.get(f"Observation/{other_id}/_history", headers=_own(issuer)), 404, "not-found")


def test_history_leaves_out_versions_that_were_another_patients(
    client: httpx.Client, issuer: TestIssuer
) -> None:
    """A resource moved from JP-0042 to P-1001: its JP-0042 versions stay JP-0042's (vread already
    refuses them; the history Bundle served them)."""
    admin = _admin(issuer)
    moved_id = ok_json(client.post("Observation", json=_observation(OTHER), headers=admin), 201)["id"]
    moved = {**_observation(OWN), "id": moved_id}
    ok_json(client.put(f"Observation/{moved_id}", json=moved, headers=admin))
    outcome(client.get(f"Observation/{moved_id}/_history/1", headers=_own(issuer)), 404, "not-found")
    history = ok_json(client.get(f"Observation/{moved_id}/_history", headers=_own(issuer)))
    subjects = [e["resource"]["subject"]["reference"] for e in history.get("entry", []) if "resource" in e]
    assert subjects == [f"Patient/{OWN}"]
    assert history["total"] == 1


def test_type_history_total_does_not_count_other_patients(client: httpx.Client, issuer: TestIssuer) -> None:
    """`_history?_count=0` under a patient/ scope returned the number of versions of every patient."""
    admin = _admin(issuer)
    for _ in range(2):
        ok_json(client.post("DiagnosticReport", json=_report(OTHER), headers=admin), 201)
    everyone = ok_json(client.get("DiagnosticReport/_history", params={"_count": 0}, headers=admin))["total"]
    own = ok_json(client.get("DiagnosticReport/_history", params={"_count": 500}, headers=_own(issuer)))
    counted = ok_json(client.get("DiagnosticReport/_history", params={"_count": 0}, headers=_own(issuer)))
    # The total of a filtered history page counts what the page kept: never another patient's versions.
    assert counted["total"] <= len(own.get("entry", [])) < everyone


def _report(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "review finding"},
        "subject": {"reference": f"Patient/{patient}"},
    }


# -- types filtered after the search ---------------------------------------------------------------


def test_count_of_post_filtered_type_does_not_count_other_patients(
    client: httpx.Client, issuer: TestIssuer
) -> None:
    """Device has no patient search parameter, so confinement filters pages; `_summary=count` (an empty
    page) kept the unfiltered total, the number of every patient's Devices."""
    implant = {
        "resourceType": "Device",
        "patient": {"reference": f"Patient/{OTHER}"},
        "deviceName": [{"name": "implant", "type": "user-friendly-name"}],
    }
    ok_json(client.post("Device", json=implant, headers=_admin(issuer)), 201)
    for params in ({"_summary": "count"}, {"_count": "0"}):
        bundle = ok_json(client.get("Device", params=params, headers=_own(issuer)))
        visible = ok_json(client.get("Device", params={"_count": 500}, headers=_own(issuer)))
        assert bundle.get("total") in (None, len(visible.get("entry", []))), params


# -- writes outside the compartment ----------------------------------------------------------------


def test_patient_scope_cannot_write_shared_devices(client: httpx.Client, issuer: TestIssuer) -> None:
    """An algorithm Device (no `patient`) is shared by every patient's reports: a patient/ scope may read
    it, but overwriting, deleting or creating one is a write outside the patient's compartment."""
    algorithm = {"resourceType": "Device", "deviceName": [{"name": "classifier", "type": "model-name"}]}
    shared_id = ok_json(client.post("Device", json=algorithm, headers=_admin(issuer)), 201)["id"]
    forged = {**algorithm, "id": shared_id, "deviceName": [{"name": "forged", "type": "model-name"}]}
    outcome(client.put(f"Device/{shared_id}", json=forged, headers=_own(issuer)), 403, "forbidden")
    outcome(client.delete(f"Device/{shared_id}", headers=_own(issuer)), 403, "forbidden")
    outcome(client.post("Device", json=algorithm, headers=_own(issuer)), 403, "forbidden")
    still = ok_json(client.get(f"Device/{shared_id}", headers=_own(issuer)))
    assert still["deviceName"][0]["name"] == "classifier"
    implant = {**algorithm, "patient": {"reference": f"Patient/{OWN}"}}
    ok_json(client.post("Device", json=implant, headers=_own(issuer)), 201)


# -- malformed transactions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        {"fullUrl": "urn:uuid:1", "request": "POST Observation"},
        {"fullUrl": {"not": "a string"}, "request": {"method": "POST", "url": "Observation"}},
        {
            "fullUrl": "urn:uuid:2",
            "request": {"method": "POST", "url": "Observation"},
            "resource": {**_observation(OWN), "resourceType": "Observation/x"},
        },
        {"fullUrl": "urn:uuid:3", "request": {"method": "POST", "url": "Observation"}, "resource": [1]},
    ],
    ids=["request-not-an-object", "fullUrl-not-a-string", "type-with-a-slash", "resource-not-an-object"],
)
def test_malformed_transaction_entry_is_400(client: httpx.Client, issuer: TestIssuer, entry: Any) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    response = client.post("", json=bundle, headers=_admin(issuer))
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


# -- $analyze jobs ---------------------------------------------------------------------------------

ANALYZED_STUDY = "1.2.826.0.1.3680043.8.498.727.9102"
ANALYZED_PATIENT = "REVIEW-ANALYZE-1"
ANALYZE_SCOPES = "launch/patient patient/ImagingStudy.rs patient/DiagnosticReport.cr"


@pytest.fixture(scope="module")
def analyzing(loaded_orthanc: EmbeddedOrthanc) -> Iterator[tuple[httpx.Client, TestIssuer]]:
    datasets = demo_brain_study(ANALYZED_STUDY, ANALYZED_PATIENT, 4)
    with httpx.Client(timeout=60) as http:
        store_instances(http, loaded_orthanc.url, datasets)
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    settings = {
        **issuer.facade_settings,
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "analyze_enabled": True,
        "analyze_worklist": False,
        "analyze_write_sr": False,
    }
    server: LiveServer
    with serve(settings, port=port) as server, httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield http, issuer
    issuer.close()


def test_analysis_job_of_another_patient_is_not_found(analyzing: tuple[httpx.Client, TestIssuer]) -> None:
    """Polling read the job's Task and DiagnosticReport on the server's own authority: any token with
    read on DiagnosticReport got another patient's report from its job URL."""
    http, issuer = analyzing
    report = ok_json(
        http.post(
            f"ImagingStudy/{ANALYZED_STUDY}/$analyze",
            headers=issuer.headers(ANALYZE_SCOPES, patient=ANALYZED_PATIENT),
        )
    )
    job_url = f"$analyze-jobs/{_task_id(http, issuer, report['id'])}"
    assert (
        http.get(job_url, headers=issuer.headers(ANALYZE_SCOPES, patient=ANALYZED_PATIENT)).status_code == 200
    )
    foreign = http.get(job_url, headers=issuer.headers(ANALYZE_SCOPES, patient=OWN))
    outcome(foreign, 404, "not-found")
    assert report["id"] not in foreign.text


def test_analysis_job_of_another_patient_cannot_be_cancelled(
    analyzing: tuple[httpx.Client, TestIssuer],
) -> None:
    http, issuer = analyzing
    queued = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [ANALYZE_CODE]},
        "focus": {"reference": f"ImagingStudy/{ANALYZED_STUDY}"},
        "for": {"reference": f"Patient/{ANALYZED_PATIENT}"},
    }
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    task_id = ok_json(http.post("Task", json=queued, headers=admin), 201)["id"]
    refused = http.delete(f"$analyze-jobs/{task_id}", headers=issuer.headers(ANALYZE_SCOPES, patient=OWN))
    outcome(refused, 404, "not-found")
    assert ok_json(http.get(f"Task/{task_id}", headers=admin))["status"] == "requested"


def _task_id(http: httpx.Client, issuer: TestIssuer, report_id: str) -> str:
    admin = issuer.headers("system/*.rs")
    tasks = ok_json(http.get("Task", params={"_count": 500}, headers=admin)).get("entry", [])
    for entry in tasks:
        outputs = entry["resource"].get("output", [])
        if any(
            o.get("valueReference", {}).get("reference") == f"DiagnosticReport/{report_id}" for o in outputs
        ):
            return str(entry["resource"]["id"])
    raise AssertionError(f"no job Task for DiagnosticReport/{report_id}")
