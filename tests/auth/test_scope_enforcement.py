"""The scope matrix over HTTP: for every resource type and every interaction the CapabilityStatement
lists, the one SMART permission that interaction needs lets the request through, and a token with
every other permission on that type gets 403 insufficient_scope. Bundles are checked entry by entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.auth.scopes import Interaction
from tests.auth.conftest import MATRIX_HOOK
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome
from tests.dicom_factory import CORPUS
from tests.subscriptions.test_rest_hook import TASK_TOPIC, subscription

FHIR_JSON = {"Content-Type": "application/fhir+json"}
PATIENT = "P-1001"
STUDY = CORPUS["mueller_mr_brain"].study_uid
ALL_LETTERS = "cruds"

#: A valid minimal body per writable type (scopes are checked after the body is read, so a denied
#: request must not fail validation first).
BODIES: dict[str, dict[str, Any]] = {
    "Patient": {"resourceType": "Patient", "name": [{"family": "Matrix"}]},
    "ServiceRequest": {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{PATIENT}"},
        "code": {"text": "MR brain"},
    },
    "Task": {"resourceType": "Task", "status": "requested", "intent": "order"},
    "DiagnosticReport": {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}},
    "Observation": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
    "Device": {"resourceType": "Device", "deviceName": [{"name": "matrix", "type": "model-name"}]},
    "Provenance": {
        "resourceType": "Provenance",
        "target": [{"reference": f"Patient/{PATIENT}"}],
        "recorded": "2024-01-01T00:00:00Z",
        "agent": [{"who": {"display": "matrix"}}],
    },
    "Communication": {"resourceType": "Communication", "status": "completed"},
    # Off: the matrix checks scopes, not delivery (the test server allows this endpoint, conftest.py).
    "Subscription": {**subscription(TASK_TOPIC, MATRIX_HOOK), "status": "off"},
}
#: interaction code -> the permission it needs
NEEDS = {
    "read": Interaction.READ,
    "vread": Interaction.READ,
    "history-instance": Interaction.READ,
    "search-type": Interaction.SEARCH,
    "history-type": Interaction.SEARCH,
    "create": Interaction.CREATE,
    "update": Interaction.UPDATE,
    "delete": Interaction.DELETE,
}


def _existing_id(client: httpx.Client, issuer: TestIssuer, resource_type: str) -> str:
    """An id that exists for the type (created here for writable types)."""
    admin = issuer.headers("system/*.cruds")
    if resource_type in BODIES:
        body = {**BODIES[resource_type], "id": f"matrix-{resource_type.lower()}"}
        response = client.put(f"{resource_type}/{body['id']}", json=body, headers={**FHIR_JSON, **admin})
        assert response.status_code in (200, 201), response.text
        return str(body["id"])
    bundle = ok_json(client.get(resource_type, params={"_count": 1}, headers=admin))
    return str(bundle["entry"][0]["resource"]["id"]) if bundle.get("entry") else "none"


def _send(
    client: httpx.Client, interaction: str, resource_type: str, resource_id: str, scope: str
) -> httpx.Response:
    headers = {**FHIR_JSON, "Authorization": f"Bearer {client.issuer.mint(scope)}"}  # type: ignore[attr-defined]
    if interaction == "read":
        return client.get(f"{resource_type}/{resource_id}", headers=headers)
    if interaction == "vread":
        return client.get(f"{resource_type}/{resource_id}/_history/1", headers=headers)
    if interaction == "history-instance":
        return client.get(f"{resource_type}/{resource_id}/_history", headers=headers)
    if interaction == "history-type":
        return client.get(f"{resource_type}/_history", headers=headers)
    if interaction == "search-type":
        return client.get(resource_type, params={"_count": 2}, headers=headers)
    if interaction == "create":
        return client.post(resource_type, json=BODIES[resource_type], headers=headers)
    if interaction == "update":
        return client.put(
            f"{resource_type}/{resource_id}",
            json={**BODIES[resource_type], "id": resource_id},
            headers=headers,
        )
    if interaction == "delete":
        return client.delete(f"{resource_type}/matrix-gone-{resource_type.lower()}", headers=headers)
    raise AssertionError(interaction)


@pytest.fixture(scope="module")
def capability(secured: LiveServer) -> dict[str, list[str]]:
    with httpx.Client(base_url=secured.base_url) as http:
        statement = http.get("metadata").json()
    return {r["type"]: [i["code"] for i in r["interaction"]] for r in statement["rest"][0]["resource"]}


@pytest.fixture
def matrix_client(client: httpx.Client, issuer: TestIssuer) -> Iterator[httpx.Client]:
    client.issuer = issuer  # type: ignore[attr-defined]
    yield client


def test_matrix_covers_every_type_and_interaction(capability: dict[str, list[str]]) -> None:
    assert {"ImagingStudy", "Patient", "Endpoint", "ServiceRequest", "Task", "Observation"} <= set(capability)
    assert all(code in NEEDS for codes in capability.values() for code in codes)


def test_scope_matrix(
    matrix_client: httpx.Client, issuer: TestIssuer, capability: dict[str, list[str]]
) -> None:
    checked = 0
    for resource_type, interactions in sorted(capability.items()):
        resource_id = _existing_id(matrix_client, issuer, resource_type)
        for interaction in interactions:
            letter = NEEDS[interaction].value
            others = ALL_LETTERS.replace(letter, "")
            denied = _send(
                matrix_client, interaction, resource_type, resource_id, f"system/{resource_type}.{others}"
            )
            where = f"{interaction} {resource_type}"
            assert denied.status_code == 403, (
                f"{where} without '{letter}': {denied.status_code} {denied.text}"
            )
            assert 'error="insufficient_scope"' in denied.headers["www-authenticate"], where
            outcome(denied, 403, "forbidden")
            # The one letter it needs, in each of the three contexts' spellings (v2 and v1).
            v1 = "read" if letter in "rs" else "write"
            for scope in (
                f"system/{resource_type}.{letter}",
                f"user/{resource_type}.{v1}",
                f"user/*.{letter}",
            ):
                allowed = _send(matrix_client, interaction, resource_type, resource_id, scope)
                assert allowed.status_code not in (401, 403), f"{where} with {scope}: {allowed.text}"
                assert allowed.status_code < 500, f"{where} with {scope}: {allowed.text}"
            checked += 1
    assert checked >= 40


def test_update_that_creates_needs_create(matrix_client: httpx.Client, issuer: TestIssuer) -> None:
    body = {**BODIES["Observation"], "id": "matrix-upsert-new"}
    refused = matrix_client.put(
        "Observation/matrix-upsert-new",
        json=body,
        headers={**FHIR_JSON, **issuer.headers("system/Observation.u")},
    )
    outcome(refused, 403, "forbidden")
    created = matrix_client.put(
        "Observation/matrix-upsert-new",
        json=body,
        headers={**FHIR_JSON, **issuer.headers("system/Observation.c")},
    )
    assert created.status_code == 201


def test_v1_read_does_not_write(matrix_client: httpx.Client, issuer: TestIssuer) -> None:
    headers = {**FHIR_JSON, **issuer.headers("user/Observation.read")}
    assert matrix_client.get("Observation", headers=headers).status_code == 200
    outcome(matrix_client.post("Observation", json=BODIES["Observation"], headers=headers), 403, "forbidden")


def test_batch_is_checked_entry_by_entry(matrix_client: httpx.Client, issuer: TestIssuer) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"ImagingStudy/{STUDY}"}},
            {"request": {"method": "POST", "url": "Observation"}, "resource": BODIES["Observation"]},
            {"request": {"method": "GET", "url": "Task?_count=1"}},
        ],
    }
    response = matrix_client.post(
        "", json=bundle, headers={**FHIR_JSON, **issuer.headers("user/ImagingStudy.rs user/Task.rs")}
    )
    statuses = [e["response"]["status"] for e in ok_json(response)["entry"]]
    assert statuses[0].startswith("200") and statuses[2].startswith("200")
    assert statuses[1].startswith("403")


def test_transaction_with_one_forbidden_entry_writes_nothing(
    matrix_client: httpx.Client, issuer: TestIssuer
) -> None:
    marker = "txn-forbidden-entry"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:6f1d3c0e-0000-4000-8000-000000000001",
                "request": {"method": "POST", "url": "Observation"},
                "resource": {
                    **BODIES["Observation"],
                    "identifier": [{"system": "urn:test", "value": marker}],
                },
            },
            {"request": {"method": "POST", "url": "Task"}, "resource": BODIES["Task"]},
        ],
    }
    response = matrix_client.post(
        "", json=bundle, headers={**FHIR_JSON, **issuer.headers("user/Observation.c")}
    )
    outcome(response, 403, "forbidden")
    found = ok_json(
        matrix_client.get(
            "Observation", params={"identifier": f"urn:test|{marker}"}, headers=issuer.headers("system/*.rs")
        )
    )
    assert found.get("total", 0) == 0 and not found.get("entry")


def test_include_of_a_type_without_scope_is_left_out(matrix_client: httpx.Client, issuer: TestIssuer) -> None:
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    task = {
        **BODIES["Task"],
        "focus": {"reference": f"ImagingStudy/{STUDY}"},
        "for": {"reference": f"Patient/{PATIENT}"},
    }
    task_id = ok_json(matrix_client.post("Task", json=task, headers=admin), 201)["id"]
    params = {"_id": task_id, "_include": "Task:focus"}
    with_scope = ok_json(
        matrix_client.get("Task", params=params, headers=issuer.headers("user/Task.rs user/ImagingStudy.r"))
    )
    assert {e["resource"]["resourceType"] for e in with_scope["entry"]} == {"Task", "ImagingStudy"}
    without = ok_json(matrix_client.get("Task", params=params, headers=issuer.headers("user/Task.rs")))
    assert [e["resource"]["resourceType"] for e in without["entry"]] == ["Task"]


def test_narrowed_scope_applies_its_query(matrix_client: httpx.Client, issuer: TestIssuer) -> None:
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    ids = {}
    for category in ("laboratory", "imaging"):
        body = {
            **BODIES["Observation"],
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": category,
                        }
                    ]
                }
            ],
        }
        ids[category] = ok_json(matrix_client.post("Observation", json=body, headers=admin), 201)["id"]
    narrowed = issuer.headers("user/Observation.rs?category=laboratory")
    lab = ok_json(matrix_client.get(f"Observation/{ids['laboratory']}", headers=narrowed))
    assert lab["id"] == ids["laboratory"]
    outcome(matrix_client.get(f"Observation/{ids['imaging']}", headers=narrowed), 404, "not-found")
    found = ok_json(
        matrix_client.get("Observation", params={"_id": ",".join(ids.values())}, headers=narrowed)
    )
    assert [e["resource"]["id"] for e in found["entry"]] == [ids["laboratory"]]
    both = issuer.headers("user/Observation.rs?category=laboratory user/Observation.rs?category=imaging")
    found = ok_json(matrix_client.get("Observation", params={"_id": ",".join(ids.values())}, headers=both))
    assert sorted(e["resource"]["id"] for e in found["entry"]) == sorted(ids.values())
