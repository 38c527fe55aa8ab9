"""Communication, the stored type added through the registry alone (docs/adr/0023): its
declaration in capability/resource-types.json and the generated R4 data are all it took. Over
HTTP on the shared facade: create, read, search by patient/subject/status, `_include`, and the
CapabilityStatement lists it with the R4 parameters."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import ok_json, outcome, validate

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _message(patient: str, status: str = "completed") -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "status": status,
        "subject": {"reference": f"Patient/{patient}"},
        "recipient": [{"reference": f"Patient/{patient}"}],
        "sent": "2026-12-04T10:05:00Z",
        "payload": [{"contentString": "Your imaging report is ready"}],
    }


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def test_communication_is_created_read_and_searched(fhir: httpx.Client) -> None:
    mine = ok_json(fhir.post("/Communication", json=_message("COMM-1"), headers=FHIR_JSON), 201)
    draft = ok_json(
        fhir.post("/Communication", json=_message("COMM-1", "in-progress"), headers=FHIR_JSON), 201
    )
    other = ok_json(fhir.post("/Communication", json=_message("COMM-2"), headers=FHIR_JSON), 201)
    validate(mine)
    assert ok_json(fhir.get(f"/Communication/{mine['id']}"))["payload"] == mine["payload"]

    by_patient = ok_json(fhir.get("/Communication", params={"patient": "COMM-1"}))
    assert _ids(by_patient) == {mine["id"], draft["id"]}
    by_subject = ok_json(fhir.get("/Communication", params={"subject": "Patient/COMM-2"}))
    assert _ids(by_subject) == {other["id"]}
    done = ok_json(fhir.get("/Communication", params={"patient": "COMM-1", "status": "completed"}))
    assert _ids(done) == {mine["id"]}
    sent = ok_json(fhir.get("/Communication", params={"patient": "COMM-1", "sent": "2026-12-04"}))
    assert _ids(sent) == {mine["id"], draft["id"]}


def test_a_communication_status_outside_its_required_value_set_is_refused(fhir: httpx.Client) -> None:
    outcome(
        fhir.post("/Communication", json=_message("COMM-3", "sent"), headers=FHIR_JSON), 400, "code-invalid"
    )


def test_the_capability_statement_lists_communication_with_its_r4_parameters(fhir: httpx.Client) -> None:
    statement = ok_json(fhir.get("/metadata"))
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Communication"]
    params = {p["name"]: p for p in entry["searchParam"]}
    assert {"patient", "subject", "status", "sender", "recipient", "sent", "_id", "_lastUpdated"} <= set(
        params
    )
    assert params["patient"]["definition"] == "http://hl7.org/fhir/SearchParameter/Communication-patient"
    assert {"create", "read", "update", "delete", "search-type"} <= {i["code"] for i in entry["interaction"]}
    assert "Communication:recipient" in entry.get("searchInclude", [])
