"""REST behaviour shared by all types: negotiation, errors as OperationOutcome, metadata."""

from __future__ import annotations

import httpx

from tests.conftest import ok_json, outcome


def test_metadata_lists_exactly_the_registered_types(fhir: httpx.Client) -> None:
    statement = ok_json(fhir.get("/metadata"))
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {
        "ImagingStudy",
        "Patient",
        "Endpoint",
        "ConceptMap",
        "CodeSystem",
        "ServiceRequest",
        "Task",
        "DiagnosticReport",
        "Observation",
        "Device",
        "Provenance",
        "AuditEvent",
        "Communication",
        "Subscription",
        "OperationDefinition",
        "Basic",  # the subscription topics, read-only (docs/adr/0026-subscriptions-design.md)
    }
    assert {i["code"] for i in resources["Task"]["interaction"]} == {
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    }
    for type_name, resource in resources.items():  # only what works is listed
        params = {p["name"]: "x" for p in resource.get("searchParam", []) if p["name"] == "_id"}
        ok_json(fhir.get(f"/{type_name}", params=params))
    study_params = {p["name"] for p in resources["ImagingStudy"]["searchParam"]}
    assert {
        "identifier",
        "patient",
        "subject",
        "started",
        "modality",
        "series",
        "instance",
        "dicom-class",
        "endpoint",
        "_id",
    } <= study_params
    assert [i["code"] for i in resources["ImagingStudy"]["interaction"]] == ["read", "search-type"]


def test_json_formats_are_accepted(fhir: httpx.Client) -> None:
    for accept in (
        "application/fhir+json",
        "application/json",
        "*/*",
        "text/html,application/xhtml+xml,*/*;q=0.8",
    ):
        ok_json(fhir.get("/metadata", headers={"Accept": accept}))
    for fmt in ("json", "application/fhir+json"):
        ok_json(fhir.get("/metadata", params={"_format": fmt}))


def test_xml_is_406(fhir: httpx.Client) -> None:
    outcome(fhir.get("/metadata", headers={"Accept": "application/fhir+xml"}), 406, "not-supported")
    outcome(fhir.get("/metadata", params={"_format": "xml"}), 406, "not-supported")
    # _format overrides Accept (http.html#mime-type)
    ok_json(fhir.get("/metadata", params={"_format": "json"}, headers={"Accept": "application/fhir+xml"}))


def test_post_search_with_xml_body_is_415(fhir: httpx.Client) -> None:
    response = fhir.post(
        "/ImagingStudy/_search", content=b"<x/>", headers={"Content-Type": "application/fhir+xml"}
    )
    outcome(response, 415, "not-supported")


def test_pretty(fhir: httpx.Client) -> None:
    assert "\n  " in fhir.get("/metadata", params={"_pretty": "true"}).text
    assert "\n" not in fhir.get("/metadata").text


def test_unknown_type_and_path_are_operation_outcomes(fhir: httpx.Client) -> None:
    outcome(fhir.get("/Spaceship"), 404, "not-supported")
    outcome(fhir.get("/Spaceship/1"), 404, "not-supported")
    outcome(fhir.get("/ImagingStudy/1/_history/1/extra"), 404, "not-found")
    outcome(fhir.delete("/ImagingStudy/1.2.3"), 405, "not-supported")


def test_mapping_artifacts_are_served(fhir: httpx.Client) -> None:
    concept_map = ok_json(fhir.get("/ConceptMap/dicom-body-part-to-snomed"))
    assert concept_map["group"][0]["target"] == "http://snomed.info/sct"
    found = ok_json(fhir.get("/ConceptMap", params={"url": concept_map["url"]}))
    assert found["total"] == 1
    ok_json(fhir.get("/CodeSystem/facade-issue"))
