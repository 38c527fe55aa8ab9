"""Endpoint: the DICOMweb services, reached through the facade's proxy."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from fhir_facade.config import Settings
from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import LiveServer, ok_json, outcome, serve

CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"


def test_three_endpoints_with_the_proxy_as_address(fhir: httpx.Client, facade: LiveServer) -> None:
    """With FACADE_AUTH=none too, the address is the facade's DICOMweb proxy, not the PACS (ADR 0016)."""
    bundle = ok_json(fhir.get("/Endpoint"))
    assert bundle["total"] == 3
    base = facade.base_url.removesuffix("/fhir") + "/dicom-web"
    assert facade.app.state.settings.dicomweb_url not in str(bundle)
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


def test_address_works_without_credentials_when_auth_is_off(fhir: httpx.Client) -> None:
    address = ok_json(fhir.get("/Endpoint/dicom-qido-rs"))["address"]
    studies = httpx.get(f"{address}/studies", headers={"Accept": "application/dicom+json"}, timeout=30)
    assert studies.status_code == 200 and studies.json()


def test_the_pacs_address_only_when_configured(loaded_orthanc: EmbeddedOrthanc) -> None:
    settings = {"dicomweb_url": loaded_orthanc.dicomweb_url, "dicomweb_expose_pacs_url": True}
    with serve(settings) as server:
        endpoint = ok_json(httpx.get(f"{server.base_url}/Endpoint/dicom-wado-rs", timeout=30))
    assert endpoint["address"] == loaded_orthanc.dicomweb_url


def test_exposing_the_pacs_address_is_refused_with_smart() -> None:
    with pytest.raises(ValidationError, match="FACADE_DICOMWEB_EXPOSE_PACS_URL"):
        Settings(auth="smart", dicomweb_expose_pacs_url=True)
