"""Persistent types over HTTP: the R4 interactions, conditional writes, Prefer, the Task state
machine, transactions, and Task?_include of a live ImagingStudy. Every test runs twice: on a
SQLite file and on a fresh PostgreSQL database (127.0.0.1:5432, or FACADE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import ok_json, outcome, serve
from tests.dicom_factory import CORPUS

ADMIN_URL = os.environ.get("FACADE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fhir(request: pytest.FixtureRequest, loaded_orthanc: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    """A facade on the shared Orthanc with a fresh store of each kind (overrides conftest's)."""
    overrides: dict[str, Any] = {"dicomweb_url": loaded_orthanc.dicomweb_url}
    name = f"facade_api_{secrets.token_hex(6)}"
    if request.param == "postgresql":
        try:
            admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}", pytrace=False)
        admin.execute(f'CREATE DATABASE "{name}"')
        overrides["database_url"] = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        with serve(overrides) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield client
    finally:
        if request.param == "postgresql":
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


FHIR_JSON = {"Content-Type": "application/fhir+json"}
STUDY_UID = CORPUS["mueller_mr_brain"].study_uid


def service_request(accession: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "system": "urn:oid:1.2.3.999",
                "value": accession,
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24590-2", "display": "MR Brain"}]},
        "subject": {"reference": "Patient/P-1001"},
        **extra,
    }


def task(status: str = "requested", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "code": {
            "coding": [{"system": "http://fhir-facade.org/fhir/CodeSystem/task-code", "code": "analyze"}]
        },
        "focus": {"reference": f"ImagingStudy/{STUDY_UID}"},
        "for": {"reference": "Patient/P-1001"},
        **extra,
    }


def post(fhir: httpx.Client, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return fhir.post(f"/{resource['resourceType']}", json=resource, headers={**FHIR_JSON, **headers})


def test_create_read_update_delete_history(fhir: httpx.Client) -> None:
    created = post(fhir, service_request("ACC-R1"))
    body = ok_json(created, 201)
    rid = body["id"]
    assert created.headers["Location"].endswith(f"/ServiceRequest/{rid}/_history/1")
    assert created.headers["ETag"] == 'W/"1"'

    read = fhir.get(f"/ServiceRequest/{rid}")
    assert ok_json(read) == body and read.headers["ETag"] == 'W/"1"'

    changed = {**body, "status": "revoked"}
    updated = fhir.put(f"/ServiceRequest/{rid}", json=changed, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
    assert ok_json(updated)["meta"]["versionId"] == "2"
    stale = fhir.put(f"/ServiceRequest/{rid}", json=changed, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
    outcome(stale, 412, "conflict")

    assert ok_json(fhir.get(f"/ServiceRequest/{rid}/_history/1"))["status"] == "active"
    assert fhir.delete(f"/ServiceRequest/{rid}").status_code == 204
    outcome(fhir.get(f"/ServiceRequest/{rid}"), 410, "deleted")
    history = ok_json(fhir.get(f"/ServiceRequest/{rid}/_history"))
    assert history["type"] == "history" and history["total"] == 3
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "PUT", "POST"]


def test_update_as_create_and_id_mismatch(fhir: httpx.Client) -> None:
    created = fhir.put("/Task/task-upsert-1", json={**task(), "id": "task-upsert-1"}, headers=FHIR_JSON)
    assert ok_json(created, 201)["id"] == "task-upsert-1"
    outcome(
        fhir.put("/Task/other", json={**task(), "id": "task-upsert-1"}, headers=FHIR_JSON), 400, "invalid"
    )


def test_conditional_create(fhir: httpx.Client) -> None:
    criteria = "identifier=urn:oid:1.2.3.999|ACC-C1"
    first = post(fhir, service_request("ACC-C1"), **{"If-None-Exist": criteria})
    second = post(fhir, service_request("ACC-C1"), **{"If-None-Exist": criteria})
    assert first.status_code == 201 and second.status_code == 200
    assert ok_json(second)["id"] == ok_json(first, 201)["id"]
    post(fhir, service_request("ACC-C1"))  # a duplicate without the condition
    outcome(post(fhir, service_request("ACC-C1"), **{"If-None-Exist": criteria}), 412, "conflict")


def test_conditional_update_by_identifier(fhir: httpx.Client) -> None:
    url = "/ServiceRequest?identifier=urn:oid:1.2.3.999|ACC-U1"
    created = fhir.put(url, json=service_request("ACC-U1"), headers=FHIR_JSON)
    rid = ok_json(created, 201)["id"]
    updated = fhir.put(url, json=service_request("ACC-U1", priority="stat"), headers=FHIR_JSON)
    assert ok_json(updated)["id"] == rid and ok_json(updated)["priority"] == "stat"


def test_prefer_return(fhir: httpx.Client) -> None:
    minimal = post(fhir, task(), Prefer="return=minimal")
    assert minimal.status_code == 201 and minimal.content == b"" and "Location" in minimal.headers
    outcome_body = ok_json(post(fhir, task(), Prefer="return=OperationOutcome"), 201)
    assert outcome_body["resourceType"] == "OperationOutcome"


def test_invalid_resource_names_the_element(fhir: httpx.Client) -> None:
    bad = {**task(), "intent": 42, "for": "Patient/P-1001"}
    response = post(fhir, bad)
    body = ok_json(response, 400)
    assert body["resourceType"] == "OperationOutcome"
    expressions = {e for issue in body["issue"] for e in issue.get("expression", [])}
    assert any(e.startswith("Task.for") for e in expressions), expressions


def test_task_state_machine(fhir: httpx.Client) -> None:
    created = ok_json(post(fhir, task()), 201)
    assert created["lastModified"] >= created["authoredOn"]
    outcome(
        fhir.put(f"/Task/{created['id']}", json={**created, "status": "completed"}, headers=FHIR_JSON),
        409,
        "conflict",
    )  # requested -> completed skips in-progress
    running = ok_json(
        fhir.put(f"/Task/{created['id']}", json={**created, "status": "in-progress"}, headers=FHIR_JSON)
    )
    done = ok_json(
        fhir.put(f"/Task/{created['id']}", json={**running, "status": "completed"}, headers=FHIR_JSON)
    )
    assert done["lastModified"] >= created["lastModified"]
    back = fhir.put(f"/Task/{created['id']}", json={**done, "status": "requested"}, headers=FHIR_JSON)
    body = outcome(back, 409, "conflict")
    assert body["issue"][0]["expression"] == ["Task.status"]
    assert ok_json(fhir.get(f"/Task/{created['id']}"))["status"] == "completed"  # nothing written


def test_task_search_with_live_focus_include(fhir: httpx.Client) -> None:
    created = ok_json(post(fhir, task(priority="urgent")), 201)
    params = {"focus": f"ImagingStudy/{STUDY_UID}", "priority": "urgent", "_include": "Task:focus"}
    bundle = ok_json(fhir.get("/Task", params=params))
    assert created["id"] in {e["resource"]["id"] for e in bundle["entry"]}
    kinds = [(e["search"]["mode"], e["resource"]["resourceType"]) for e in bundle["entry"]]
    assert ("match", "Task") in kinds and ("include", "ImagingStudy") in kinds
    study = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
    assert study["id"] == STUDY_UID and study["numberOfSeries"] == 3  # computed live from Orthanc


def test_transaction_rewrites_placeholders_and_is_all_or_nothing(fhir: httpx.Client) -> None:
    order_url = "urn:uuid:2b4f9b2e-3c1d-4e57-9a0a-1f2e3d4c5b6a"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7c9e6679-7425-40de-944b-e07fc1f90ae7",
                "resource": task(basedOn=[{"reference": order_url}]),
                "request": {"method": "POST", "url": "Task"},
            },
            {
                "fullUrl": order_url,
                "resource": service_request("ACC-T1"),
                "request": {"method": "POST", "url": "ServiceRequest"},
            },
        ],
    }
    response = ok_json(fhir.post("", json=bundle, headers=FHIR_JSON))
    assert response["type"] == "transaction-response"
    stored_task, stored_order = (e["resource"] for e in response["entry"])
    assert stored_task["basedOn"][0]["reference"] == f"ServiceRequest/{stored_order['id']}"
    ok_json(fhir.get(f"/ServiceRequest/{stored_order['id']}"))

    failing = {
        **bundle,
        "entry": [
            {
                "fullUrl": order_url,
                "resource": service_request("ACC-T2"),
                "request": {"method": "POST", "url": "ServiceRequest"},
            },
            {"resource": {**task(), "intent": 42}, "request": {"method": "POST", "url": "Task"}},
        ],
    }
    assert fhir.post("", json=failing, headers=FHIR_JSON).status_code == 400
    found = ok_json(fhir.get("/ServiceRequest", params={"identifier": "urn:oid:1.2.3.999|ACC-T2"}))
    assert found["total"] == 0  # the first entry was rolled back


def test_transaction_conditional_create_with_placeholder_finds_the_existing_resource(
    fhir: httpx.Client,
) -> None:
    """A conditional create (ifNoneExist) under a urn:uuid fullUrl creates once; sent again it
    answers 200 with the stored resource and references to the placeholder point at it
    (http.html#trules). It used to run as a plain update-as-create and ignore ifNoneExist."""
    order_url = "urn:uuid:0d5e7c1a-8f3b-4a2e-9c6d-5b4a3f2e1d0c"
    criteria = "identifier=urn:oid:1.2.3.999|ACC-T3"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:f47ac10b-58cc-4372-a567-0e02b2c3d479",
                "resource": task(basedOn=[{"reference": order_url}]),
                "request": {"method": "POST", "url": "Task"},
            },
            {
                "fullUrl": order_url,
                "resource": service_request("ACC-T3"),
                "request": {"method": "POST", "url": "ServiceRequest", "ifNoneExist": criteria},
            },
        ],
    }
    first = ok_json(fhir.post("", json=bundle, headers=FHIR_JSON))
    assert [e["response"]["status"] for e in first["entry"]] == ["201 Created", "201 Created"]
    order_id = first["entry"][1]["resource"]["id"]

    second = ok_json(fhir.post("", json=bundle, headers=FHIR_JSON))
    assert [e["response"]["status"] for e in second["entry"]] == ["201 Created", "200 OK"]
    assert second["entry"][1]["resource"]["id"] == order_id
    assert second["entry"][0]["resource"]["basedOn"][0]["reference"] == f"ServiceRequest/{order_id}"
    assert ok_json(fhir.get(f"/ServiceRequest?{criteria}"))["total"] == 1


@pytest.mark.parametrize("status", ["requested", "in-progress"])
def test_task_search_by_status_and_paging(fhir: httpx.Client, status: str) -> None:
    for _ in range(3):
        post(fhir, task(status, businessStatus={"text": f"paging-{status}"}))
    first = ok_json(fhir.get("/Task", params={"status": status, "_count": 2}))
    assert len(first["entry"]) == 2 and first["total"] >= 3
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = ok_json(httpx.get(nxt))
    ids = {e["resource"]["id"] for e in first["entry"]}
    assert not ids & {e["resource"]["id"] for e in second["entry"]}


def test_paging_stays_consistent_while_tasks_are_added(fhir: httpx.Client) -> None:
    marker = {"text": "paging-consistency"}
    for _ in range(5):
        post(fhir, task("requested", businessStatus=marker))
    query: dict[str, Any] = {"status": "requested", "_count": 2}
    first = ok_json(fhir.get("/Task", params=query))
    total = first["total"]
    seen = [e["resource"]["id"] for e in first["entry"]]
    page = first
    while any(link["relation"] == "next" for link in page["link"]):
        post(fhir, task("requested", businessStatus=marker))  # arrives while the client pages
        nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
        page = ok_json(httpx.get(nxt))
        assert page["total"] == total
        seen += [e["resource"]["id"] for e in page["entry"]]
    assert len(seen) == len(set(seen)) == total
    fresh = ok_json(fhir.get("/Task", params=query))
    assert fresh["total"] > total  # a new search sees the added Tasks


def test_results_searched_by_result_part_of_derived_from_and_device(fhir: httpx.Client) -> None:
    """DiagnosticReport?result, Observation?part-of/derived-from/device: how a worklist finds the
    report of a finding and the findings of a study."""
    marker = secrets.token_hex(4)
    device = ok_json(
        fhir.post(
            "/Device",
            json={"resourceType": "Device", "identifier": [{"system": "urn:test", "value": marker}]},
            headers=FHIR_JSON,
        ),
        201,
    )
    obs = ok_json(
        fhir.post(
            "/Observation",
            json={
                "resourceType": "Observation",
                "status": "preliminary",
                "code": {"text": marker},
                "partOf": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
                "derivedFrom": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
                "device": {"reference": f"Device/{device['id']}"},
            },
            headers=FHIR_JSON,
        ),
        201,
    )
    report = ok_json(
        fhir.post(
            "/DiagnosticReport",
            json={
                "resourceType": "DiagnosticReport",
                "status": "preliminary",
                "code": {"text": marker},
                "result": [{"reference": f"Observation/{obs['id']}"}],
            },
            headers=FHIR_JSON,
        ),
        201,
    )
    by_result = ok_json(fhir.get("/DiagnosticReport", params={"result": f"Observation/{obs['id']}"}))
    assert [e["resource"]["id"] for e in by_result["entry"]] == [report["id"]]
    for name in ("part-of", "derived-from"):
        found = ok_json(fhir.get("/Observation", params={name: f"ImagingStudy/{STUDY_UID}", "_count": "500"}))
        assert obs["id"] in {e["resource"]["id"] for e in found["entry"]}
    by_device = ok_json(fhir.get("/Observation", params={"device": f"Device/{device['id']}"}))
    assert [e["resource"]["id"] for e in by_device["entry"]] == [obs["id"]]
    assert ok_json(fhir.get("/Device", params={"identifier": f"urn:test|{marker}"}))["total"] == 1
    assert ok_json(fhir.get("/DiagnosticReport", params={"result": "Observation/none"}))["total"] == 0


def test_observations_searched_by_focus(fhir: httpx.Client) -> None:
    """Observation?focus (R4 Observation-focus): the radiologist's agreement with the AI (ADR 0034)
    is found by the signed report it is about; the parameter used to be ignored (every Observation
    matched)."""
    reports = [f"DiagnosticReport/{secrets.token_hex(8)}" for _ in range(3)]
    ai_report = reports[2]
    ids = [
        ok_json(
            fhir.post(
                "/Observation",
                json={
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "agreement"},
                    "focus": [{"reference": signed}, {"reference": ai_report}],
                },
                headers=FHIR_JSON,
            ),
            201,
        )["id"]
        for signed in reports[:2]
    ]
    for signed, observation in zip(reports[:2], ids, strict=True):
        found = ok_json(fhir.get("/Observation", params={"focus": signed}))
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [observation]
    both = ok_json(fhir.get("/Observation", params={"focus": ai_report}))
    assert sorted(e["resource"]["id"] for e in both["entry"]) == sorted(ids)


class TestPatientsCreatedByAnEhr:
    """Patient is the DICOM view plus the Patients an EHR writes, which are stored."""

    def test_create_read_search_next_to_the_dicom_view(self, fhir: httpx.Client) -> None:
        mrn = f"EHR-{secrets.token_hex(4)}"
        created = ok_json(
            fhir.post(
                "/Patient",
                json={
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:oid:1.2.3.999", "value": mrn}],
                    "name": [{"family": "Ehrlich", "given": ["Erika"]}],
                    "gender": "female",
                    "birthDate": "1980-02-29",
                },
                headers=FHIR_JSON,
            ),
            201,
        )
        assert ok_json(fhir.get(f"/Patient/{created['id']}"))["name"][0]["family"] == "Ehrlich"
        found = ok_json(fhir.get("/Patient", params={"identifier": f"urn:oid:1.2.3.999|{mrn}"}))
        assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]
        by_name = ok_json(fhir.get("/Patient", params={"name": "ehrl", "birthdate": "1980-02"}))
        assert created["id"] in {e["resource"]["id"] for e in by_name["entry"]}
        # The DICOM view is still there, in the same search.
        everyone = ok_json(fhir.get("/Patient", params={"_count": "500"}))
        ids = {e["resource"]["id"] for e in everyone["entry"]}
        assert {created["id"], "P-1001"} <= ids
        assert everyone["total"] == len(everyone["entry"])

    def test_a_stored_patient_shadows_the_dicom_view_and_delete_is_410(self, fhir: httpx.Client) -> None:
        dicom_view = ok_json(fhir.get("/Patient/P-1001"))
        assert "meta" not in dicom_view or "versionId" not in dicom_view.get("meta", {})
        record = {
            "resourceType": "Patient",
            "id": "ehr-shadow-1",
            "name": [{"family": "Shadow"}],
        }
        ok_json(fhir.put("/Patient/ehr-shadow-1", json=record, headers=FHIR_JSON), 201)
        assert ok_json(fhir.get("/Patient/ehr-shadow-1"))["meta"]["versionId"] == "1"
        assert fhir.delete("/Patient/ehr-shadow-1").status_code in (200, 204)
        outcome(fhir.get("/Patient/ehr-shadow-1"), 410, "deleted")
        history = ok_json(fhir.get("/Patient/ehr-shadow-1/_history"))
        assert history["total"] == 2

    def test_capability_statement_lists_patient_writes(self, fhir: httpx.Client) -> None:
        statement = ok_json(fhir.get("/metadata"))
        patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
        assert {"create", "update", "delete", "read", "search-type"} <= {
            i["code"] for i in patient["interaction"]
        }
