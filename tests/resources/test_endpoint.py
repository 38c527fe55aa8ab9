"""Endpoint: the PACS's DICOMweb services."""

from __future__ import annotations

import httpx

from tests.conftest import LiveServer, ok_json, outcome

CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"


def test_three_endpoints_with_the_dicomweb_base(fhir: httpx.Client, facade: LiveServer) -> None:
    bundle = ok_json(fhir.get("/Endpoint"))
    assert bundle["total"] == 3
    base = facade.app.state.settings.dicomweb_url
    by_id = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    assert set(by_id) == {"dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs"}
    for endpoint_id, endpoint in by_id.items():
        assert endpoint["connectionType"] == {"system": CONNECTION_TYPES, "code": endpoint_id}
        assert endpoint["address"] == base and not endpoint["address"].endswith("/")
        assert endpoint["payloadType"] and endpoint["status"] == "active"


def test_read_and_search(fhir: httpx.Client) -> None:
    ok_json(fhir.get("/Endpoint/dicom-wado-rs"))
    outcome(fhir.get("/Endpoint/nope"), 404, "not-found")
    found = ok_json(fhir.get("/Endpoint", params={"connection-type": f"{CONNECTION_TYPES}|dicom-qido-rs"}))
    assert [e["resource"]["id"] for e in found["entry"]] == ["dicom-qido-rs"]
    assert ok_json(fhir.get("/Endpoint", params={"status": "off"}))["total"] == 0


def test_imaging_study_endpoint_resolves(fhir: httpx.Client) -> None:
    study = ok_json(fhir.get("/ImagingStudy", params={"_count": 1}))["entry"][0]["resource"]
    ok_json(fhir.get(f"/{study['endpoint'][0]['reference']}"))
