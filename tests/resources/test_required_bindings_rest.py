"""Required terminology bindings over HTTP (R4 terminologies.html#required; ADR 0015): a coded
element outside its required value set is a 400 `code-invalid` naming the element, on create,
update and in a transaction (which then stores nothing); valid resources are still stored.

Before the fix the R4B models took any string for a `code`, and each of these was stored (201)."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from tests.conftest import ok_json, outcome
from tests.dicom_factory import CORPUS

FHIR_JSON = {"Content-Type": "application/fhir+json"}
STUDY_UID = CORPUS["mueller_mr_brain"].study_uid


def task(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "focus": {"reference": f"ImagingStudy/{STUDY_UID}"},
        "for": {"reference": "Patient/P-1001"},
        **extra,
    }


def observation(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "59776-5"}]},
        "subject": {"reference": "Patient/P-1001"},
        **extra,
    }


def report(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": "Patient/P-1001"},
        **extra,
    }


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.999", "value": f"BIND-{secrets.token_hex(4)}"}],
        "name": [{"family": "Bindung"}],
        "gender": "female",
        **extra,
    }


#: (the resource, the element expected in issue.expression): the conformance issue's five, plus
#: a repeating element inside a datatype inside a backbone element.
INVALID = [
    (task(status="bogus"), "Task.status"),
    (observation(status="nonsense"), "Observation.status"),
    (patient(gender="banana"), "Patient.gender"),
    (task(priority="super"), "Task.priority"),
    (report(status="weird"), "DiagnosticReport.status"),
    (
        observation(
            component=[
                {"code": {"text": "a"}, "valueQuantity": {"value": 1, "comparator": "<"}},
                {"code": {"text": "b"}, "valueQuantity": {"value": 2, "comparator": "about"}},
            ]
        ),
        "Observation.component[1].valueQuantity.comparator",
    ),
]


def total(fhir: httpx.Client, resource_type: str, **params: str) -> int:
    return int(ok_json(fhir.get(f"/{resource_type}", params={**params, "_summary": "count"}))["total"])


@pytest.mark.parametrize(("resource", "expression"), INVALID, ids=[e for _, e in INVALID])
def test_create_outside_a_required_value_set_is_400(
    fhir: httpx.Client, resource: dict[str, Any], expression: str
) -> None:
    resource_type = resource["resourceType"]
    before = total(fhir, resource_type)
    body = outcome(fhir.post(f"/{resource_type}", json=resource, headers=FHIR_JSON), 400, "code-invalid")
    assert [issue["expression"] for issue in body["issue"]] == [[expression]]
    assert total(fhir, resource_type) == before, "nothing was stored"


@pytest.mark.parametrize("resource", [task(priority="stat"), observation(), report(), patient()])
def test_valid_codes_are_still_stored(fhir: httpx.Client, resource: dict[str, Any]) -> None:
    ok_json(fhir.post(f"/{resource['resourceType']}", json=resource, headers=FHIR_JSON), 201)


def test_update_outside_a_required_value_set_is_400(fhir: httpx.Client) -> None:
    created = ok_json(fhir.post("/Task", json=task(), headers=FHIR_JSON), 201)
    changed = {**created, "priority": "super"}
    body = outcome(fhir.put(f"/Task/{created['id']}", json=changed, headers=FHIR_JSON), 400, "code-invalid")
    assert body["issue"][0]["expression"] == ["Task.priority"]
    assert ok_json(fhir.get(f"/Task/{created['id']}"))["meta"]["versionId"] == "1"


def test_a_transaction_with_one_bad_code_stores_nothing(fhir: httpx.Client) -> None:
    marker = f"BIND-TX-{secrets.token_hex(4)}"
    identifier = [{"system": "urn:test:bindings", "value": marker}]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": task(identifier=identifier), "request": {"method": "POST", "url": "Task"}},
            {
                "resource": report(identifier=identifier, status="weird"),
                "request": {"method": "POST", "url": "DiagnosticReport"},
            },
        ],
    }
    body = outcome(fhir.post("", json=bundle, headers=FHIR_JSON), 400, "code-invalid")
    assert body["issue"][0]["expression"] == ["DiagnosticReport.status"]
    query = {"identifier": f"urn:test:bindings|{marker}"}
    assert total(fhir, "Task", **query) == 0 and total(fhir, "DiagnosticReport", **query) == 0

    bundle["entry"][1]["resource"]["status"] = "final"
    response = ok_json(fhir.post("", json=bundle, headers=FHIR_JSON))
    assert [e["response"]["status"][:3] for e in response["entry"]] == ["201", "201"]
    assert total(fhir, "Task", **query) == 1 and total(fhir, "DiagnosticReport", **query) == 1


def test_a_bad_status_is_400_before_the_task_state_machine(fhir: httpx.Client) -> None:
    """An unknown status is an invalid resource (400), not a refused transition (409)."""
    created = ok_json(fhir.post("/Task", json=task(), headers=FHIR_JSON), 201)
    changed = {**created, "status": "bogus"}
    body = outcome(fhir.put(f"/Task/{created['id']}", json=changed, headers=FHIR_JSON), 400, "code-invalid")
    assert body["issue"][0]["expression"] == ["Task.status"]
