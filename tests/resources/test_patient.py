"""Patient, the DICOM view, live from Orthanc: read by id (plain and issuer-qualified) and search."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ok_json, outcome

DEFAULT_SYSTEM = "urn:oid:2.16.840.1.113883.3.3719.1.1"


def ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_read_patient(fhir: httpx.Client) -> None:
    patient = ok_json(fhir.get("/Patient/P-1001"))
    assert patient["identifier"][0]["system"] == DEFAULT_SYSTEM
    assert patient["identifier"][0]["value"] == "P-1001"
    assert patient["name"][0]["family"] == "Müller" and patient["name"][0]["given"] == ["Hans"]
    assert patient["birthDate"] == "1965-04-12" and patient["gender"] == "male"


def test_patient_with_issuer_round_trips_through_the_study(fhir: httpx.Client) -> None:
    study_bundle = ok_json(fhir.get("/ImagingStudy", params={"identifier": "ACC-4004"}))
    subject = study_bundle["entry"][0]["resource"]["subject"]
    assert subject["identifier"] == {
        **subject["identifier"],
        "system": "urn:oid:1.2.3.4.5",
        "value": "MRN-555",
    }
    patient = ok_json(fhir.get(f"/{subject['reference']}"))
    assert patient["identifier"][0]["system"] == "urn:oid:1.2.3.4.5"
    studies = ok_json(fhir.get("/ImagingStudy", params={"patient": subject["reference"]}))
    assert [e["resource"]["identifier"][1]["value"] for e in studies["entry"]] == ["ACC-4004"]


def test_non_ascii_names(fhir: httpx.Client) -> None:
    patient = ok_json(fhir.get("/Patient/JP-0042"))
    texts = " ".join(n.get("text", "") + n.get("family", "") for n in patient["name"])
    assert "山田" in texts and "Yamada" in texts


def test_unknown_patient_is_404(fhir: httpx.Client) -> None:
    outcome(fhir.get("/Patient/NOPE-999"), 404, "not-found")
    outcome(fhir.get("/Patient/x.notbase32!"), 404, "not-found")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"identifier": f"{DEFAULT_SYSTEM}|P-1001"}, {"P-1001"}),
        ({"identifier": "P-1001"}, {"P-1001"}),
        ({"name": "mull"}, {"P-1001"}),  # accent- and case-insensitive starts-with
        ({"name": "hans"}, {"P-1001"}),
        ({"name:exact": "Müller"}, {"P-1001"}),
        ({"name:exact": "müller"}, set()),
        ({"name:contains": "arm"}, {"IN-7007"}),
        ({"birthdate": "1965-04-12"}, {"P-1001"}),
        ({"birthdate": "1965"}, {"P-1001"}),
        ({"gender": "female", "birthdate": "ge1970"}, {"IN-7007"}),
        ({"_id": "P-1001,JP-0042"}, {"P-1001", "JP-0042"}),
    ],
)
def test_search(fhir: httpx.Client, params: dict[str, str], expected: set[str]) -> None:
    found = ids(ok_json(fhir.get("/Patient", params={**params, "_count": 500})))
    corpus_ids = {"P-1001", "JP-0042", "IN-7007", "P-2002", "ANON-0001", "P-3003"}
    assert found & corpus_ids == expected


def test_patient_paging(fhir: httpx.Client) -> None:
    first = ok_json(fhir.get("/Patient", params={"_count": 4}))
    assert first["total"] >= 7 and len(first["entry"]) == 4
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = ok_json(httpx.get(nxt))
    assert not ids(first) & ids(second)
