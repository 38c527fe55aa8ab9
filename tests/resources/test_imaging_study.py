"""ImagingStudy, live from a real Orthanc over QIDO-RS: mapping, every search parameter, paging."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import CORPUS, series_instance_uid, sop_instance_uid
from tests.narrative_checks import narrative_text

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
CORPUS_UIDS = {spec.study_uid: key for key, spec in CORPUS.items()}
MR_BRAIN = CORPUS["mueller_mr_brain"]


def search(fhir: httpx.Client, **params: Any) -> dict[str, Any]:
    return ok_json(fhir.get("/ImagingStudy", params=params))


def corpus_keys(bundle: dict[str, Any]) -> set[str]:
    """The corpus studies in a result (pydicom's own test files are in the PACS too)."""
    ids = [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    return {CORPUS_UIDS[i] for i in ids if i in CORPUS_UIDS}


def test_read_maps_the_whole_study(fhir: httpx.Client) -> None:
    study = ok_json(fhir.get(f"/ImagingStudy/{MR_BRAIN.study_uid}"))
    assert study["id"] == MR_BRAIN.study_uid
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{MR_BRAIN.study_uid}"} in study["identifier"]
    accession = next(i for i in study["identifier"] if i.get("type"))
    assert accession["value"] == "ACC-1001"
    assert accession["type"]["coding"][0]["code"] == "ACSN"
    assert study["status"] == "available"
    assert study["subject"]["reference"] == "Patient/P-1001"
    assert study["subject"]["identifier"]["value"] == "P-1001"
    assert study["started"] == "2024-01-15T08:30:00+01:00"
    assert study["modality"] == [{"system": DCM, "code": "MR"}]
    assert study["description"] == "MRI BRAIN WITHOUT CONTRAST"
    assert "Schmidt" in study["referrer"]["display"]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (3, 7)
    assert study["endpoint"] == [{"reference": "Endpoint/dicom-wado-rs"}]
    series = study["series"]
    assert [s["number"] for s in series] == [1, 2, 3]
    first = series[0]
    assert first["uid"] == series_instance_uid(MR_BRAIN.study_uid, 1)
    assert first["modality"]["code"] == "MR" and first["description"] == "SAG T1"
    assert first["numberOfInstances"] == 3
    assert first["bodySite"]["system"] == SNOMED and first["bodySite"]["code"] == "69536005"
    assert first["started"].startswith("2024-01-15T08:35:12")
    assert series[2]["laterality"]["system"] == SNOMED
    assert [i["number"] for i in first["instance"]] == [1, 2, 3]
    assert first["instance"][0]["uid"] == sop_instance_uid(first["uid"], 1)
    assert first["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": "urn:oid:1.2.840.10008.5.1.4.1.1.4",
    }


def test_read_unknown_study_is_404(fhir: httpx.Client) -> None:
    outcome(fhir.get("/ImagingStudy/1.2.3.4.5.6.7.8.9"), 404, "not-found")
    outcome(fhir.get("/ImagingStudy/not_a_valid%20id"), 404, "not-found")


def test_every_study_in_the_pacs_maps_to_valid_fhir(fhir: httpx.Client, facade: LiveServer) -> None:
    """Includes pydicom's odd test files: missing dates, bad names, other character sets."""
    bundle = search(fhir, _count=500)
    assert bundle["total"] >= len(CORPUS) + 10
    assert len(bundle["entry"]) == bundle["total"]
    for entry in bundle["entry"][:40]:
        ok_json(fhir.get(f"/ImagingStudy/{entry['resource']['id']}"))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"identifier": f"urn:dicom:uid|urn:oid:{MR_BRAIN.study_uid}"}, {"mueller_mr_brain"}),
        ({"identifier": f"urn:oid:{MR_BRAIN.study_uid}"}, {"mueller_mr_brain"}),
        ({"identifier": "ACC-1002"}, {"mueller_ct_chest"}),
        (
            {"identifier": f"ACC-1002,urn:oid:{MR_BRAIN.study_uid}"},
            {"mueller_ct_chest", "mueller_mr_brain"},
        ),
        ({"identifier": "http://other.example|ACC-1002"}, set()),
        (
            {"_id": f"{MR_BRAIN.study_uid},{CORPUS['yamada_mr'].study_uid}"},
            {"mueller_mr_brain", "yamada_mr"},
        ),
        ({"patient": "Patient/P-1001"}, {"mueller_mr_brain", "mueller_ct_chest"}),
        ({"patient": "P-1001"}, {"mueller_mr_brain", "mueller_ct_chest"}),
        ({"subject": "Patient/P-1001"}, {"mueller_mr_brain", "mueller_ct_chest"}),
        ({"subject:identifier": "urn:oid:1.2.3.4.5|MRN-555"}, {"issuer_ct"}),
        ({"subject:identifier": "MRN-555"}, {"issuer_ct"}),
        ({"subject:identifier": "urn:oid:2.16.840.1.113883.3.3719.1.1|MRN-555"}, set()),
        (
            {"subject:identifier": "urn:oid:2.16.840.1.113883.3.3719.1.1|P-1001"},
            {"mueller_mr_brain", "mueller_ct_chest"},
        ),
        ({"patient": "Patient/MRN-555"}, set()),  # that PatientID exists only with an issuer
        ({"started": "2024-01-15"}, {"mueller_mr_brain"}),
        ({"started": "2024-06"}, {"yamada_mr"}),
        ({"started": ["ge2024-04-01", "lt2024-07"]}, {"sharma_mixed", "yamada_mr"}),
        ({"started": "2024-02-02T04:00:00Z"}, {"issuer_ct"}),
        ({"started": "gt2024-02-02T03:59:00Z", "patient": "x.invalid"}, set()),
        ({"started": "2023-12-24T12:00:00+01:00"}, {"no_accession"}),  # no offset: Europe/Berlin
        ({"modality": "MR", "patient": "P-1001"}, {"mueller_mr_brain"}),
        ({"modality": f"{DCM}|CT", "patient": "IN-7007"}, {"sharma_mixed"}),
        ({"modality": "http://loinc.org|MR"}, set()),
        ({"series": series_instance_uid(MR_BRAIN.study_uid, 2)}, {"mueller_mr_brain"}),
        (
            {"instance": sop_instance_uid(series_instance_uid(CORPUS["yamada_mr"].study_uid, 1), 2)},
            {"yamada_mr"},
        ),
        ({"status": "available", "_id": MR_BRAIN.study_uid}, {"mueller_mr_brain"}),
        ({"status": "cancelled"}, set()),
        ({"endpoint": "Endpoint/dicom-wado-rs", "_id": MR_BRAIN.study_uid}, {"mueller_mr_brain"}),
        ({"endpoint": "Endpoint/elsewhere"}, set()),
    ],
)
def test_search_parameters(fhir: httpx.Client, params: dict[str, Any], expected: set[str]) -> None:
    assert corpus_keys(search(fhir, **params)) == expected


V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{V2_0203}|ACSN|ACC-1002", {"mueller_ct_chest"}),
        (f"{V2_0203}|ACSN|ACC-1002,{V2_0203}|ACSN|ACC-1001", {"mueller_ct_chest", "mueller_mr_brain"}),
        (f"{V2_0203}|ACSN|ACC-0000", set()),
        (f"{V2_0203}|MR|ACC-1002", set()),  # the accession number is typed ACSN, not MR
        ("http://other.example|ACSN|ACC-1002", set()),
    ],
)
def test_identifier_of_type_finds_the_accession_number(
    fhir: httpx.Client, value: str, expected: set[str]
) -> None:
    """`identifier:of-type=system|code|value` (FHIR R4 search.html#token), the way an EHR asks
    for a study by accession number without knowing the issuer's identifier system."""
    bundle = search(fhir, **{"identifier:of-type": value})
    assert corpus_keys(bundle) == expected
    for entry in bundle.get("entry", []):
        accession = next(i for i in entry["resource"]["identifier"] if i.get("type"))
        assert accession["type"]["coding"][0] == {"system": V2_0203, "code": "ACSN"}


@pytest.mark.parametrize("value", [f"{V2_0203}|ACSN", f"{V2_0203}||ACC-1002", "ACC-1002"])
def test_identifier_of_type_needs_all_three_parts(fhir: httpx.Client, value: str) -> None:
    body = outcome(fhir.get("/ImagingStudy", params={"identifier:of-type": value}), 400, "invalid")
    assert body["issue"][0]["expression"] == ["identifier:of-type"]


def test_started_ne_and_prefixes_exclude_the_day(fhir: httpx.Client) -> None:
    keys = corpus_keys(search(fhir, started="ne2024-01-15", _count=500))
    assert "mueller_mr_brain" not in keys and "mueller_ct_chest" in keys
    assert "no_date_no_name" not in keys  # no date: matches no date search
    assert "mueller_mr_brain" not in corpus_keys(search(fhir, started="gt2024-01-15", _count=500))
    assert "mueller_mr_brain" in corpus_keys(search(fhir, started="le2024-01-15", _count=500))


def test_dicom_class(fhir: httpx.Client) -> None:
    ct = search(fhir, **{"dicom-class": "urn:ietf:rfc:3986|urn:oid:1.2.840.10008.5.1.4.1.1.2"}, _count=500)
    keys = corpus_keys(ct)
    assert {"mueller_ct_chest", "issuer_ct", "sharma_mixed", "no_accession"} <= keys
    assert "mueller_mr_brain" not in keys


def test_paging_links_walk_every_match_once(fhir: httpx.Client) -> None:
    first = search(fhir, modality="CT,MR", _count=3)
    total = first["total"]
    assert total >= 8
    seen: list[str] = []
    page: dict[str, Any] | None = first
    pages = 0
    while page is not None:
        entries = page.get("entry", [])
        assert len(entries) <= 3
        seen += [e["resource"]["id"] for e in entries]
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert page["total"] == total
        if pages:
            assert "previous" in links
        page = ok_json(httpx.get(links["next"], timeout=30)) if "next" in links else None
        pages += 1
    assert len(seen) == total == len(set(seen))
    assert pages == -(-total // 3)


def test_previous_link_returns_the_previous_page(fhir: httpx.Client) -> None:
    first = search(fhir, _count=2)
    second = ok_json(httpx.get(next(link["url"] for link in first["link"] if link["relation"] == "next")))
    back = ok_json(httpx.get(next(link["url"] for link in second["link"] if link["relation"] == "previous")))
    assert [e["resource"]["id"] for e in back["entry"]] == [e["resource"]["id"] for e in first["entry"]]


def test_count_zero_and_summary_count_give_only_the_total(fhir: httpx.Client) -> None:
    everything = search(fhir, _count=500)["total"]
    for params in ({"_count": 0}, {"_summary": "count"}):
        bundle = search(fhir, **params)
        assert bundle["total"] == everything and "entry" not in bundle


def test_total_none_leaves_total_out(fhir: httpx.Client) -> None:
    assert "total" not in search(fhir, _count=2, _total="none")


def test_elements_and_summary(fhir: httpx.Client) -> None:
    bundle = search(fhir, _id=MR_BRAIN.study_uid, _elements="identifier")
    study = bundle["entry"][0]["resource"]
    assert set(study) <= {"resourceType", "id", "meta", "identifier", "status", "subject"}
    assert study["meta"]["tag"][0]["code"] == "SUBSETTED"
    summary = search(fhir, _id=MR_BRAIN.study_uid, _summary="true")["entry"][0]["resource"]
    assert "series" in summary and summary["meta"]["tag"][0]["code"] == "SUBSETTED"


def test_self_link_drops_unknown_parameters(fhir: httpx.Client) -> None:
    bundle = search(fhir, modality="MR", bogus="1")
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    params = dict(parse_qsl(urlsplit(self_link).query))
    assert params["modality"] == "MR" and "bogus" not in params


def test_strict_handling_rejects_unknown_parameters(fhir: httpx.Client) -> None:
    response = fhir.get("/ImagingStudy", params={"bogus": "1"}, headers={"Prefer": "handling=strict"})
    body = outcome(response, 400, "not-supported")
    assert body["issue"][0]["expression"] == ["bogus"]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"started": "2024-13-01"}, "started"),
        ({"_count": "-3"}, "_count"),
        ({"patient": "Device/1"}, "patient"),
        ({"identifier": ""}, "identifier"),
    ],
)
def test_malformed_values_are_400_naming_the_parameter(
    fhir: httpx.Client, params: dict[str, str], name: str
) -> None:
    body = outcome(fhir.get("/ImagingStudy", params=params), 400, "invalid")
    assert body["issue"][0]["expression"] == [name]


def test_unsupported_modifier_is_400(fhir: httpx.Client) -> None:
    outcome(fhir.get("/ImagingStudy", params={"modality:text": "MR"}), 400, "not-supported")


def test_search_by_post(fhir: httpx.Client) -> None:
    response = fhir.post("/ImagingStudy/_search", data={"identifier": "ACC-1002"})
    assert corpus_keys(ok_json(response)) == {"mueller_ct_chest"}


def test_page_size_does_not_change_the_number_of_qido_requests(
    fhir: httpx.Client, facade: LiveServer
) -> None:
    """No N+1: one study query, one series query (and a count query) whatever the page size."""
    counts = []
    for size in (2, 5, 10):
        before = facade.app.state.dicomweb.request_count
        assert len(search(fhir, _count=size, started="ge2004")["entry"]) == size
        counts.append(facade.app.state.dicomweb.request_count - before)
    assert counts[0] == counts[1] == counts[2] <= 3


@pytest.mark.parametrize(
    "params",
    [
        {"_count": 1},
        {"_count": 2, "started": "ge2004"},
        {"_count": 1, "patient": "P-1001"},
        {"_count": 1, "identifier": "ACC-1001,ACC-1002"},
        {"_count": 3, "_offset": 1000},
    ],
)
def test_orthanc_count_agrees_with_counting_over_qido(
    fhir: httpx.Client, loaded_orthanc: EmbeddedOrthanc, params: dict[str, Any]
) -> None:
    """With FACADE_ORTHANC_URL the total comes from /tools/find; without, from QIDO: same number."""
    with serve({"dicomweb_url": loaded_orthanc.dicomweb_url}) as qido_only:
        by_qido = ok_json(httpx.get(qido_only.base_url + "/ImagingStudy", params=params))["total"]
    assert search(fhir, **params)["total"] == by_qido


def test_include_patient_and_endpoint(fhir: httpx.Client) -> None:
    bundle = search(fhir, patient="P-1001", _include=["ImagingStudy:patient", "ImagingStudy:endpoint"])
    modes = [(e["search"]["mode"], e["resource"]["resourceType"]) for e in bundle["entry"]]
    assert modes.count(("match", "ImagingStudy")) == 2
    assert ("include", "Patient") in modes and ("include", "Endpoint") in modes
    assert len(modes) == 4  # the shared Patient and Endpoint are included once each
    for entry in bundle["entry"]:  # every virtual resource carries its generated narrative
        narrative_text(entry["resource"])
    study = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
    narrative_text(study, "Patient", "P-1001", "Modalities")


def test_unsupported_include_is_400(fhir: httpx.Client) -> None:
    outcome(fhir.get("/ImagingStudy", params={"_include": "ImagingStudy:referrer"}), 400, "invalid")
    outcome(fhir.get("/ImagingStudy", params={"_include": "nonsense"}), 400, "invalid")
