"""Batch Bundles at POST [base]: each entry dispatched to its interaction, errors per entry."""

from __future__ import annotations

import httpx

from tests.conftest import ok_json, outcome
from tests.dicom_factory import CORPUS

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def test_batch_mixes_successes_and_failures(fhir: httpx.Client) -> None:
    uid = CORPUS["yamada_mr"].study_uid
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"ImagingStudy/{uid}"}},
            {"request": {"method": "GET", "url": "Endpoint?_id=dicom-qido-rs"}},
            {"request": {"method": "GET", "url": "ImagingStudy/1.2.3.4.404"}},
            {
                "request": {"method": "POST", "url": "ImagingStudy"},
                "resource": {
                    "resourceType": "ImagingStudy",
                    "status": "available",
                    "subject": {"reference": "Patient/x"},
                },
            },
            {"request": {"method": "GET", "url": "Spaceship/1"}},
        ],
    }
    response = ok_json(fhir.post("", json=bundle, headers=FHIR_JSON))
    assert response["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert statuses == ["200 OK", "200 OK", "404", "405", "404"]
    assert response["entry"][0]["resource"]["id"] == uid
    assert response["entry"][1]["resource"]["total"] == 1
    assert response["entry"][2]["response"]["outcome"]["issue"][0]["code"] == "not-found"


def test_bad_bundles_are_400(fhir: httpx.Client) -> None:
    outcome(
        fhir.post("", json={"resourceType": "Bundle", "type": "collection"}, headers=FHIR_JSON),
        400,
        "invalid",
    )
    outcome(fhir.post("", json={"resourceType": "Patient"}, headers=FHIR_JSON), 400, "invalid")
    outcome(fhir.post("", content=b"{not json", headers=FHIR_JSON), 400, "structure")
    incomplete = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET"}}]}
    entry = ok_json(fhir.post("", json=incomplete, headers=FHIR_JSON))["entry"][0]
    assert entry["response"]["status"] == "400"
