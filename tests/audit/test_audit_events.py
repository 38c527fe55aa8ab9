"""One AuditEvent per request, over real HTTP against the facade on the shared Orthanc, on SQLite
and PostgreSQL: read, search, create, delete, a 404 and a 400 each leave exactly one event with
the interaction, outcome, entities, the caller's address and the request's correlation id, valid
FHIR R4; AuditEvent itself is read-only through the API."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests.audit.conftest import audit_events, audited, correlation_of, events_with, query_of
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.dicom_factory import CORPUS
from tests.narrative_checks import narrative_text

ADMIN_URL = os.environ.get("FACADE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FHIR_JSON = {"Content-Type": "application/fhir+json"}
STUDY = CORPUS["mueller_mr_brain"]
SUBTYPE = "http://hl7.org/fhir/restful-interaction"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def facade(request: pytest.FixtureRequest, loaded_orthanc: EmbeddedOrthanc) -> Iterator[LiveServer]:
    overrides: dict[str, Any] = {"dicomweb_url": loaded_orthanc.dicomweb_url}
    name = f"facade_audit_{secrets.token_hex(6)}"
    if request.param == "postgresql":
        try:
            admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}", pytrace=False)
        admin.execute(f'CREATE DATABASE "{name}"')
        overrides["database_url"] = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        with audited(overrides) as server:
            yield server
    finally:
        if request.param == "postgresql":
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


@pytest.fixture
def fhir(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=facade.base_url, timeout=30) as client:
        yield client


def observation(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": f"Patient/{STUDY.patient_id}"},
        **extra,
    }


def the_event(fhir: httpx.Client, correlation: str) -> dict[str, Any]:
    """The one AuditEvent of the request with this correlation id, validated as R4."""
    events = events_with(fhir, correlation)
    assert len(events) == 1, f"{len(events)} AuditEvents for {correlation}"
    validate(events[0])
    return events[0]


def validate_event(event: dict[str, Any]) -> dict[str, Any]:
    validate(event)
    return event


def subtype(event: dict[str, Any]) -> str:
    (coding,) = event["subtype"]
    assert coding["system"] == SUBTYPE
    code: str = coding["code"]
    return code


def what(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})]


def check_common(event: dict[str, Any], correlation: str) -> None:
    assert event["type"]["code"] == "rest"
    assert correlation_of(event) == correlation
    (agent,) = event["agent"]  # FACADE_AUTH=none: one, unauthenticated, agent
    assert agent["requestor"] is True
    assert agent["network"] == {"address": "127.0.0.1", "type": "2"}
    assert "FACADE_AUTH=none" in agent["name"]
    assert event["source"]["observer"]["display"].startswith("fhir-facade ")
    narrative_text(
        event, f"X-Request-Id {correlation}", "unauthenticated", "from 127.0.0.1", event["outcomeDesc"]
    )


def test_create_read_search_delete_each_leave_one_event(
    fhir: httpx.Client, unique: Callable[[str], str]
) -> None:
    ids = {step: unique(step) for step in ("create", "read", "search", "delete")}

    created = ok_json(
        fhir.post(
            "/Observation", json=observation(), headers={**FHIR_JSON, "X-Correlation-ID": ids["create"]}
        ),
        201,
    )
    event = the_event(fhir, ids["create"])
    check_common(event, ids["create"])
    assert (subtype(event), event["action"], event["outcome"]) == ("create", "C", "0")
    assert f"Observation/{created['id']}" in what(event), "the id the create assigned (Location)"

    ok_json(fhir.get(f"/Observation/{created['id']}", headers={"X-Correlation-ID": ids["read"]}))
    event = the_event(fhir, ids["read"])
    check_common(event, ids["read"])
    assert (subtype(event), event["action"], event["outcome"]) == ("read", "R", "0")
    assert what(event) == [f"Observation/{created['id']}"]

    ok_json(
        fhir.get(
            "/Observation",
            params={"patient": STUDY.patient_id, "status": "preliminary"},
            headers={"X-Correlation-ID": ids["search"]},
        )
    )
    event = the_event(fhir, ids["search"])
    check_common(event, ids["search"])
    assert (subtype(event), event["action"], event["outcome"]) == ("search-type", "R", "0")
    assert query_of(event) == f"Observation?patient={STUDY.patient_id}&status=preliminary"
    patient = next(
        e for e in event["entity"] if e.get("what", {}).get("reference", "").startswith("Patient/")
    )
    assert patient["what"]["reference"] == f"Patient/{STUDY.patient_id}"
    assert patient["role"]["code"] == "1"

    assert (
        fhir.delete(f"/Observation/{created['id']}", headers={"X-Correlation-ID": ids["delete"]}).status_code
        == 204
    )
    event = the_event(fhir, ids["delete"])
    check_common(event, ids["delete"])
    assert (subtype(event), event["action"], event["outcome"]) == ("delete", "D", "0")
    assert what(event) == [f"Observation/{created['id']}"]


def test_not_found_and_bad_request_are_audited_as_failures(
    fhir: httpx.Client, unique: Callable[[str], str]
) -> None:
    missing, bad = unique("missing"), unique("bad")
    outcome(fhir.get("/Observation/does-not-exist", headers={"X-Correlation-ID": missing}), 404, "not-found")
    event = the_event(fhir, missing)
    check_common(event, missing)
    assert (subtype(event), event["action"], event["outcome"]) == ("read", "R", "4")
    assert event["outcomeDesc"] == "GET /fhir/Observation/does-not-exist: 404 Not Found"
    assert what(event) == ["Observation/does-not-exist"]

    response = fhir.post("/Observation", content=b"{not json", headers={**FHIR_JSON, "X-Correlation-ID": bad})
    outcome(response, 400, "structure")
    event = the_event(fhir, bad)
    check_common(event, bad)
    assert (subtype(event), event["action"], event["outcome"]) == ("create", "C", "4")
    assert what(event) == [], "nothing was created"


def test_history_vread_transaction_and_operations(fhir: httpx.Client, unique: Callable[[str], str]) -> None:
    created = ok_json(fhir.post("/Observation", json=observation(), headers=FHIR_JSON), 201)
    vread, history, bundle, status = (unique(x) for x in ("vread", "history", "bundle", "status"))
    ok_json(fhir.get(f"/Observation/{created['id']}/_history/1", headers={"X-Correlation-ID": vread}))
    event = the_event(fhir, vread)
    assert (subtype(event), what(event)) == ("vread", [f"Observation/{created['id']}/_history/1"])

    ok_json(fhir.get(f"/Observation/{created['id']}/_history", headers={"X-Correlation-ID": history}))
    assert subtype(the_event(fhir, history)) == "history-instance"

    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": observation(), "request": {"method": "POST", "url": "Observation"}}],
    }
    (entry,) = ok_json(fhir.post("", json=transaction, headers={**FHIR_JSON, "X-Correlation-ID": bundle}))[
        "entry"
    ]
    # The request's event, and one for each entry (IHE BALP; the audit stage, ADR 0022).
    events = events_with(fhir, bundle, at_least=2)
    by_subtype = {subtype(validate_event(e)): e for e in events}
    assert sorted(by_subtype) == ["create", "transaction"], events
    request_event, entry_event = by_subtype["transaction"], by_subtype["create"]
    assert (request_event["action"], request_event["outcome"]) == ("E", "0")
    assert (entry_event["action"], entry_event["outcome"]) == ("C", "0")
    assert what(entry_event) == [f"Observation/{entry['resource']['id']}"]
    assert "(bundle-entry)" in entry_event["outcomeDesc"]
    assert correlation_of(entry_event) == bundle

    # No upstream here: $sync-status is not offered, and the 404 is audited as an operation.
    fhir.get("/$sync-status", headers={"X-Correlation-ID": status})
    event = the_event(fhir, status)
    assert (subtype(event), event["action"]) == ("operation", "E")
    assert any(e.get("name") == "$sync-status" for e in event["entity"])


def test_audit_events_are_read_only(fhir: httpx.Client) -> None:
    """Audit records are immutable: create, update and delete are 405 OperationOutcomes, also as
    Bundle entries; read and search work (every request above left one)."""
    existing = audit_events(fhir)[0]
    event = {**existing}
    event.pop("meta")
    outcome(fhir.post("/AuditEvent", json=event, headers=FHIR_JSON), 405, "not-supported")
    outcome(fhir.put(f"/AuditEvent/{existing['id']}", json=existing, headers=FHIR_JSON), 405, "not-supported")
    outcome(fhir.delete(f"/AuditEvent/{existing['id']}"), 405, "not-supported")
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": event, "request": {"method": "POST", "url": "AuditEvent"}},
            {"request": {"method": "DELETE", "url": f"AuditEvent/{existing['id']}"}},
        ],
    }
    answer = ok_json(fhir.post("", json=batch, headers=FHIR_JSON))
    assert [e["response"]["status"].split()[0] for e in answer["entry"]] == ["405", "405"]
    assert ok_json(fhir.get(f"/AuditEvent/{existing['id']}"))["meta"]["versionId"] == "1"

    statement = ok_json(fhir.get("/metadata"))
    audit = next(r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert {i["code"] for i in audit["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "history-type",
        "search-type",
    }
    params = {p["name"] for p in audit["searchParam"]}
    assert {"date", "type", "subtype", "action", "outcome", "agent", "patient", "entity", "source"} <= params


def test_audit_events_are_searchable_by_their_parameters(
    fhir: httpx.Client, unique: Callable[[str], str]
) -> None:
    marker = unique("search-params")
    outcome(fhir.get("/Observation/audit-search-404", headers={"X-Correlation-ID": marker}), 404, "not-found")
    event = the_event(fhir, marker)
    found = ok_json(
        fhir.get(
            "/AuditEvent",
            params={
                "entity": "Observation/audit-search-404",
                "outcome": "4",
                "subtype": f"{SUBTYPE}|read",
                "action": "R",
                "type": "rest",
                "date": f"ge{event['recorded'][:10]}",
                "address": "127.0.0.1",
            },
        )
    )
    assert [e["resource"]["id"] for e in found["entry"]] == [event["id"]]
    by_patient = ok_json(fhir.get("/AuditEvent", params={"patient": STUDY.patient_id, "_count": "200"}))
    assert by_patient["total"] >= 1


def test_metadata_and_docs_are_not_audited(
    facade: LiveServer, fhir: httpx.Client, unique: Callable[[str], str]
) -> None:
    root = facade.base_url.removesuffix("/fhir")
    marker = unique("metadata")
    ok_json(fhir.get("/metadata", headers={"X-Correlation-ID": marker}))
    httpx.get(f"{root}/openapi.json", headers={"X-Correlation-ID": marker}, timeout=30)
    httpx.get(f"{root}/metrics", headers={"X-Correlation-ID": marker}, timeout=30)
    probe = unique("probe")
    outcome(fhir.get("/Observation/probe-404", headers={"X-Correlation-ID": probe}), 404, "not-found")
    assert events_with(fhir, probe), "the recorder is running"
    assert not [e for e in audit_events(fhir) if correlation_of(e) == marker]


def test_audit_off_records_nothing(loaded_orthanc: EmbeddedOrthanc) -> None:
    """With auditing off (the default with FACADE_AUTH=none) requests leave no AuditEvent and
    get no audit middleware."""
    with (
        serve({"dicomweb_url": loaded_orthanc.dicomweb_url}) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as fhir,
    ):
        ok_json(fhir.post("/Observation", json=observation(), headers=FHIR_JSON), 201)
        outcome(fhir.get("/Observation/nothing-here"), 404, "not-found")
        assert getattr(server.app.state, "audit", None) is None
        assert ok_json(fhir.get("/AuditEvent", params={"_summary": "count"}))["total"] == 0
