"""Cross-patient access attempts: a `patient/` token for P-1001 against every virtual and persistent
type. Another patient's resources are 404 on read, absent from searches, history and `_include`, and
cannot be written; the PACS is queried for the patient in context only."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from fhir_facade.dicom_to_fhir import patient_resource_id
from tests.auth.issuer import TestIssuer
from tests.conftest import ok_json, outcome
from tests.dicom_factory import CORPUS

FHIR_JSON = {"Content-Type": "application/fhir+json"}
OWN, OTHER = "P-1001", "JP-0042"
OWN_STUDIES = {CORPUS["mueller_mr_brain"].study_uid, CORPUS["mueller_ct_chest"].study_uid}
OTHER_STUDY = CORPUS["yamada_mr"].study_uid
PATIENT_SCOPES = "launch/patient patient/*.cruds"


def _subject(resource_type: str, patient: str) -> dict[str, Any]:
    reference = {"reference": f"Patient/{patient}"}
    bodies: dict[str, dict[str, Any]] = {
        "ServiceRequest": {
            "status": "draft",
            "intent": "order",
            "subject": reference,
            "code": {"text": "MR"},
        },
        "Task": {"status": "requested", "intent": "order", "for": reference},
        "DiagnosticReport": {"status": "final", "code": {"text": "report"}, "subject": reference},
        "Observation": {"status": "final", "code": {"text": "finding"}, "subject": reference},
        "Device": {"patient": reference, "deviceName": [{"name": "implant", "type": "user-friendly-name"}]},
    }
    return {"resourceType": resource_type, **bodies[resource_type]}


STORED_TYPES = ("ServiceRequest", "Task", "DiagnosticReport", "Observation", "Device")


@pytest.fixture(scope="module")
def data(secured: Any, issuer: TestIssuer) -> dict[str, dict[str, str]]:
    """One resource per persistent type for each patient (+ Provenance on each report), written with a
    system token; returns {patient: {type: id}}."""
    made: dict[str, dict[str, str]] = {OWN: {}, OTHER: {}}
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    with httpx.Client(base_url=secured.base_url, timeout=30) as http:
        for patient in (OWN, OTHER):
            for resource_type in STORED_TYPES:
                created = ok_json(
                    http.post(resource_type, json=_subject(resource_type, patient), headers=admin), 201
                )
                made[patient][resource_type] = created["id"]
            provenance = {
                "resourceType": "Provenance",
                "target": [{"reference": f"DiagnosticReport/{made[patient]['DiagnosticReport']}"}],
                "recorded": "2024-05-01T10:00:00Z",
                "agent": [{"who": {"display": "radiologist"}}],
            }
            made[patient]["Provenance"] = ok_json(
                http.post("Provenance", json=provenance, headers=admin), 201
            )["id"]
        algorithm = {"resourceType": "Device", "deviceName": [{"name": "classifier", "type": "model-name"}]}
        made["shared"] = {"Device": ok_json(http.post("Device", json=algorithm, headers=admin), 201)["id"]}
    return made


def _own(issuer: TestIssuer, scope: str = PATIENT_SCOPES, patient: str = OWN) -> dict[str, str]:
    return {**FHIR_JSON, **issuer.headers(scope, patient=patient)}


def _ids(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


@pytest.mark.parametrize("resource_type", [*STORED_TYPES, "Provenance"])
def test_read_own_and_not_other(
    client: httpx.Client, issuer: TestIssuer, data: Any, resource_type: str
) -> None:
    own = ok_json(client.get(f"{resource_type}/{data[OWN][resource_type]}", headers=_own(issuer)))
    assert own["id"] == data[OWN][resource_type]
    other_id = data[OTHER][resource_type]
    for path in (
        f"{resource_type}/{other_id}",
        f"{resource_type}/{other_id}/_history/1",
        f"{resource_type}/{other_id}/_history",
    ):
        outcome(client.get(path, headers=_own(issuer)), 404, "not-found")


@pytest.mark.parametrize("resource_type", [*STORED_TYPES, "Provenance"])
def test_search_and_history_leave_out_other(
    client: httpx.Client, issuer: TestIssuer, data: Any, resource_type: str
) -> None:
    every = ",".join([data[OWN][resource_type], data[OTHER][resource_type]])
    found = _ids(ok_json(client.get(resource_type, params={"_id": every}, headers=_own(issuer))))
    assert found == {data[OWN][resource_type]}
    if resource_type not in ("Device", "Provenance"):  # those have no patient parameter
        asked = ok_json(client.get(resource_type, params={"patient": OTHER}, headers=_own(issuer)))
        assert not asked.get("entry")
    history = ok_json(client.get(f"{resource_type}/_history", params={"_count": 500}, headers=_own(issuer)))
    ids = {e["resource"]["id"] for e in history.get("entry", []) if "resource" in e}
    assert data[OTHER][resource_type] not in ids and data[OWN][resource_type] in ids


def test_shared_algorithm_device_is_visible(client: httpx.Client, issuer: TestIssuer, data: Any) -> None:
    ok_json(client.get(f"Device/{data['shared']['Device']}", headers=_own(issuer)))


def test_imaging_study(client: httpx.Client, issuer: TestIssuer) -> None:
    outcome(client.get(f"ImagingStudy/{OTHER_STUDY}", headers=_own(issuer)), 404, "not-found")
    for study in OWN_STUDIES:
        ok_json(client.get(f"ImagingStudy/{study}", headers=_own(issuer)))
    assert (
        _ids(ok_json(client.get("ImagingStudy", params={"_count": 100}, headers=_own(issuer)))) == OWN_STUDIES
    )
    assert not ok_json(client.get("ImagingStudy", params={"patient": OTHER}, headers=_own(issuer))).get(
        "entry"
    )
    assert not ok_json(client.get("ImagingStudy", params={"_id": OTHER_STUDY}, headers=_own(issuer))).get(
        "entry"
    )
    unconfined = ok_json(
        client.get("ImagingStudy", params={"_count": 100}, headers=_own(issuer, "user/*.rs"))
    )
    assert OTHER_STUDY in _ids(unconfined)


def test_patient_with_an_issuer(client: httpx.Client, issuer: TestIssuer) -> None:
    spec = CORPUS["issuer_ct"]
    patient_id = patient_resource_id(spec.patient_id, spec.issuer_of_patient_id)
    assert patient_id and patient_id.startswith("x.")
    headers = _own(issuer, patient=patient_id)
    assert _ids(ok_json(client.get("ImagingStudy", params={"_count": 100}, headers=headers))) == {
        spec.study_uid
    }
    ok_json(client.get(f"Patient/{patient_id}", headers=headers))
    outcome(client.get(f"Patient/{OWN}", headers=headers), 404, "not-found")


def test_patient(client: httpx.Client, issuer: TestIssuer) -> None:
    assert ok_json(client.get(f"Patient/{OWN}", headers=_own(issuer)))["id"] == OWN
    outcome(client.get(f"Patient/{OTHER}", headers=_own(issuer)), 404, "not-found")
    assert _ids(ok_json(client.get("Patient", params={"_count": 100}, headers=_own(issuer)))) == {OWN}


def test_endpoint_holds_no_patient_data(client: httpx.Client, issuer: TestIssuer) -> None:
    assert _ids(ok_json(client.get("Endpoint", headers=_own(issuer, "patient/Endpoint.rs"))))


def test_include_and_revinclude_leave_out_other(client: httpx.Client, issuer: TestIssuer, data: Any) -> None:
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    own_study = sorted(OWN_STUDIES)[0]
    # A Task of the patient in context that (wrongly or not) points at another patient's study ...
    crossing = {**_subject("Task", OWN), "focus": {"reference": f"ImagingStudy/{OTHER_STUDY}"}}
    task_id = ok_json(client.post("Task", json=crossing, headers=admin), 201)["id"]
    bundle = ok_json(
        client.get("Task", params={"_id": task_id, "_include": "Task:focus"}, headers=_own(issuer))
    )
    assert _ids(bundle) == {task_id} and not _ids(bundle, "include")
    # ... and another patient's Task that points at this patient's study.
    foreign = {**_subject("Task", OTHER), "focus": {"reference": f"ImagingStudy/{own_study}"}}
    foreign_id = ok_json(client.post("Task", json=foreign, headers=admin), 201)["id"]
    bundle = ok_json(
        client.get(
            "ImagingStudy", params={"_id": own_study, "_revinclude": "Task:focus"}, headers=_own(issuer)
        )
    )
    assert foreign_id not in _ids(bundle, "include")
    unconfined = ok_json(
        client.get(
            "ImagingStudy",
            params={"_id": own_study, "_revinclude": "Task:focus"},
            headers=_own(issuer, "user/*.rs"),
        )
    )
    assert foreign_id in _ids(unconfined, "include")


def test_writes_for_other_patient_are_refused(client: httpx.Client, issuer: TestIssuer, data: Any) -> None:
    outcome(
        client.post("Observation", json=_subject("Observation", OTHER), headers=_own(issuer)),
        403,
        "forbidden",
    )
    own_id = data[OWN]["Observation"]
    moved = {**_subject("Observation", OTHER), "id": own_id}
    outcome(client.put(f"Observation/{own_id}", json=moved, headers=_own(issuer)), 403, "forbidden")
    other_id = data[OTHER]["Observation"]
    stolen = {**_subject("Observation", OWN), "id": other_id}
    outcome(client.put(f"Observation/{other_id}", json=stolen, headers=_own(issuer)), 404, "not-found")
    outcome(client.delete(f"Observation/{other_id}", headers=_own(issuer)), 404, "not-found")
    still = ok_json(client.get(f"Observation/{other_id}", headers=issuer.headers("system/*.rs")))
    assert still["subject"]["reference"] == f"Patient/{OTHER}"
    created = client.post("Observation", json=_subject("Observation", OWN), headers=_own(issuer))
    assert created.status_code == 201


def test_transaction_for_other_patient_writes_nothing(client: httpx.Client, issuer: TestIssuer) -> None:
    marker = {"system": "urn:test", "value": "confined-transaction"}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": {**_subject("Observation", OWN), "identifier": [marker]},
            },
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": {**_subject("Observation", OTHER), "identifier": [marker]},
            },
        ],
    }
    outcome(client.post("", json=bundle, headers=_own(issuer)), 403, "forbidden")
    found = ok_json(
        client.get(
            "Observation",
            params={"identifier": "urn:test|confined-transaction"},
            headers=issuer.headers("system/*.rs"),
        )
    )
    assert not found.get("entry")


def test_batch_read_of_other_patient(client: httpx.Client, issuer: TestIssuer, data: Any) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Observation/{data[OWN]['Observation']}"}},
            {"request": {"method": "GET", "url": f"Observation/{data[OTHER]['Observation']}"}},
            {"request": {"method": "GET", "url": f"ImagingStudy?_id={OTHER_STUDY}"}},
        ],
    }
    entries = ok_json(client.post("", json=bundle, headers=_own(issuer)))["entry"]
    assert entries[0]["response"]["status"].startswith("200")
    assert entries[1]["response"]["status"].startswith("404")
    assert not entries[2]["resource"].get("entry")


def test_patient_scope_without_patient_context_is_refused(client: httpx.Client, issuer: TestIssuer) -> None:
    response = client.get("Observation", headers={**FHIR_JSON, **issuer.headers("patient/*.rs")})
    outcome(response, 403, "forbidden")


def _patients_of(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})} & {
        f"Patient/{OWN}",
        f"Patient/{OTHER}",
    }


def test_audit_events_of_other_patients_stay_hidden(
    client: httpx.Client, issuer: TestIssuer, data: Any
) -> None:
    """An AuditEvent is in the compartment of every patient it names (R4 AuditEvent `patient`): the
    other patient's own requests stay hidden; this patient's own (even a search naming the other
    patient) are visible."""
    for patient in (OWN, OTHER):
        ok_json(client.get("Observation", headers=_own(issuer, patient=patient)))
    auditor = issuer.headers("system/AuditEvent.rs")
    deadline = time.monotonic() + 10
    while True:  # events are written off the request path
        every = ok_json(client.get("AuditEvent", params={"patient": OTHER, "_count": 500}, headers=auditor))
        only_other = [
            e["resource"]["id"]
            for e in every.get("entry", [])
            if _patients_of(e["resource"]) == {f"Patient/{OTHER}"}
        ]
        if only_other or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert only_other, "the other patient's own requests were audited"
    confined = _own(issuer, "launch/patient patient/AuditEvent.rs")
    mine = ok_json(client.get("AuditEvent", params={"_count": 500}, headers=confined))
    assert mine.get("entry")
    for entry in mine["entry"]:
        assert f"Patient/{OWN}" in _patients_of(entry["resource"])
        assert entry["resource"]["id"] not in only_other
    outcome(client.get(f"AuditEvent/{only_other[0]}", headers=confined), 404, "not-found")
