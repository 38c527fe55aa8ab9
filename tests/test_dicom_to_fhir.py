"""Pure DICOM JSON -> FHIR R4 mapping: fast unit tests, every resource validated with R4B models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
import pydicom.data
import pytest
from fhir.resources.R4B.conceptmap import ConceptMap
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydicom.dataset import Dataset

from fhir_facade.dicom_to_fhir import (
    MappingContext,
    body_site_coding,
    concept_map,
    endpoints,
    fhir_date,
    fhir_datetime,
    first_value,
    human_names,
    identifier_system_to_issuer,
    imaging_study_from_dicom,
    integer,
    laterality_coding,
    parse_patient_resource_id,
    patient_from_dicom,
    patient_identifier,
    patient_resource_id,
    person_name,
    started_instant,
    started_range,
    string,
    strings,
)
from tests.narrative_checks import narrative_text

DEFAULT_SYSTEM = "urn:oid:2.16.840.1.113883.3.3719.1.1"
BERLIN = ZoneInfo("Europe/Berlin")
CTX = MappingContext(
    patient_identifier_system=DEFAULT_SYSTEM,
    issuer_systems={"HOSP_A": "http://hospital-a.example.org/mrn"},
    default_timezone=BERLIN,
    dicomweb_url="http://pacs.example.org/dicom-web/",
)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_1 = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_2 = "1.2.826.0.1.3680043.8.498.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def element(vr: str, *values: Any) -> dict[str, Any]:
    """A DICOM JSON attribute (PS3.18 F.2.2); no values gives the empty form (no "Value" key)."""
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def study_json(**overrides: dict[str, Any]) -> dict[str, Any]:
    study = {
        "0020000D": element("UI", STUDY_UID),
        "00080020": element("DA", "20240315"),
        "00080030": element("TM", "143005.25"),
        "00080201": element("SH", "+0530"),
        "00080050": element("SH", "ACC-42"),
        "00080061": element("CS", "MR", "SR"),
        "00081030": element("LO", "MRT Schädel nativ"),
        "00080090": element("PN", {"Alphabetic": "House^Gregory^^Dr."}),
        "00100010": element("PN", {"Alphabetic": "Müller^Hans"}),
        "00100020": element("LO", "PAT-001"),
        "00100030": element("DA", "19800102"),
        "00100040": element("CS", "M"),
        "00201206": element("IS", 2),
        "00201208": element("IS", "3"),
    }
    study.update(overrides)
    return study


def series_json(uid: str, number: Any, modality: str | None, **extra: dict[str, Any]) -> dict:
    series: dict[str, Any] = {
        "0020000D": element("UI", STUDY_UID),
        "0020000E": element("UI", uid),
        "00200011": element("IS", number) if number is not None else element("IS"),
        "0008103E": element("LO", f"series {number}"),
    }
    if modality:
        series["00080060"] = element("CS", modality)
    series.update(extra)
    return series


def instance_json(series_uid: str, number: int | None, sop_class: str | None = MR_STORAGE) -> dict:
    instance: dict[str, Any] = {
        "0020000E": element("UI", series_uid),
        "00080018": element("UI", f"{series_uid}.{number if number is not None else 99}"),
        "00200013": element("IS", number) if number is not None else element("IS"),
    }
    if sop_class:
        instance["00080016"] = element("UI", sop_class)
    return instance


def validate_study(resource: dict[str, Any]) -> ImagingStudy:
    return ImagingStudy.model_validate(resource)


# --- attributes -------------------------------------------------------------------------------


def test_attribute_readers_forgive_odd_values() -> None:
    ds = {
        "00080050": element("SH"),
        "00081030": element("LO", "  padded  "),
        "00201208": element("IS", " 12 "),
        "00201206": element("IS", 7),
        "00201209": element("IS", "abc"),
        "00200011": element("IS", "3.0"),
        "00080061": element("CS", "CT", "", "PT"),
        "00100010": element("PN", "Doe^John=ドウ^ジョン"),
        "00100011": {"vr": "PN", "Value": "not-a-list"},
        "00100012": "garbage",
    }
    assert first_value(ds, "00080050") is None
    assert first_value(ds, "99999999") is None
    assert string(ds, "00080050") is None
    assert string(ds, "00081030") == "padded"
    assert integer(ds, "00201208") == 12
    assert integer(ds, "00201206") == 7
    assert integer(ds, "00201209") is None
    assert integer(ds, "00200011") == 3
    assert strings(ds, "00080061") == ["CT", "PT"]
    assert person_name(ds, "00100010") == {"Alphabetic": "Doe^John", "Ideographic": "ドウ^ジョン"}
    assert person_name(ds, "00100011") is None
    assert person_name(ds, "00100012") is None
    assert string(ds, "00100012") is None


# --- dates and times --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("da", "expected"),
    [
        ("20240315", "2024-03-15"),
        ("2024.03.15", "2024-03-15"),  # retired ACR-NEMA form (PS3.5 6.2)
        ("2020", None),
        ("20201399", None),
        ("20230229", None),
        ("", None),
        (None, None),
        ("yesterday", None),
    ],
)
def test_fhir_date(da: str | None, expected: str | None) -> None:
    assert fhir_date(da) == expected


@pytest.mark.parametrize(
    ("tm", "offset", "expected"),
    [
        ("143005", "+0530", "2024-03-15T14:30:05+05:30"),
        ("143005.123", "-0400", "2024-03-15T14:30:05.123-04:00"),
        ("14", "+0000", "2024-03-15T14:00:00+00:00"),
        ("1430", "+0100", "2024-03-15T14:30:00+01:00"),
        ("143005.123456", "+0100", "2024-03-15T14:30:05.123456+01:00"),
        ("14:30:05", "+0100", "2024-03-15T14:30:05+01:00"),  # retired colon form
        ("143005", None, "2024-03-15T14:30:05+01:00"),  # Berlin, winter time
        ("143005", "bogus", "2024-03-15T14:30:05+01:00"),  # invalid offset -> default zone
        ("2530", "+0100", "2024-03-15"),  # bad time degrades to the date
        ("1430051", "+0100", "2024-03-15"),
        ("", "+0100", "2024-03-15"),
        (None, None, "2024-03-15"),
    ],
)
def test_fhir_datetime(tm: str | None, offset: str | None, expected: str) -> None:
    assert fhir_datetime("20240315", tm, offset, BERLIN) == expected


def test_fhir_datetime_uses_default_zone_dst_for_that_date() -> None:
    assert fhir_datetime("20240715", "0900", None, BERLIN) == "2024-07-15T09:00:00+02:00"
    assert fhir_datetime("20240115", "0900", None, BERLIN) == "2024-01-15T09:00:00+01:00"
    new_york = ZoneInfo("America/New_York")
    assert fhir_datetime("20240715", "0900", None, new_york) == "2024-07-15T09:00:00-04:00"
    assert fhir_datetime("20240115", "0900", None, UTC) == "2024-01-15T09:00:00+00:00"
    assert fhir_datetime("2024011", "0900", None, UTC) is None


def test_started_instant_and_range() -> None:
    start = started_instant("20240315", "143005.5", "-0400", BERLIN)
    assert start == datetime(2024, 3, 15, 18, 30, 5, 500000, tzinfo=UTC)
    assert start is not None and start.utcoffset() == timedelta(hours=-4)
    bounds = started_range("20240315", "1430", "+0530", BERLIN)
    assert bounds is not None
    assert bounds[1] - bounds[0] == timedelta(minutes=1)
    day = started_range("20240715", None, None, BERLIN)
    assert day == (
        datetime(2024, 7, 15, tzinfo=BERLIN),
        datetime(2024, 7, 16, tzinfo=BERLIN),
    )
    assert day[0].utcoffset() == timedelta(hours=2)
    assert started_instant("2020", "1200", None, BERLIN) is None
    fixed = started_instant("20240315", "00", "+0000", BERLIN)
    assert fixed == datetime(2024, 3, 15, tzinfo=UTC)


# --- names ------------------------------------------------------------------------------------


def test_human_names_alphabetic_with_all_components() -> None:
    names = human_names({"Alphabetic": "Müller^Hans^Peter^Dr.^Jr."})
    assert names == [
        {
            "use": "official",
            "text": "Dr. Hans Peter Müller Jr.",
            "family": "Müller",
            "given": ["Hans", "Peter"],
            "prefix": ["Dr."],
            "suffix": ["Jr."],
        }
    ]


def test_human_names_ideographic_and_phonetic_groups() -> None:
    names = human_names(
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    )
    assert [n.get("use") for n in names] == ["official", None, None]
    assert names[1]["family"] == "山田" and names[1]["given"] == ["太郎"]
    assert names[1]["text"] == "山田 太郎"
    assert names[1]["extension"][0]["valueCode"] == "IDE"
    assert names[2]["extension"][0]["valueCode"] == "SYL"
    Patient.model_validate({"resourceType": "Patient", "name": names})


@pytest.mark.parametrize("pn", [{"Alphabetic": "^^^"}, {"Alphabetic": "  ^ ^"}, {}, None])
def test_human_names_empty(pn: dict[str, str] | None) -> None:
    assert human_names(pn) == []


def test_human_names_ideographic_only_and_extra_components() -> None:
    names = human_names({"Ideographic": "山田^太郎"})
    assert len(names) == 1 and "use" not in names[0]
    assert human_names({"Alphabetic": "A^B^C^D^E^F^G"})[0]["suffix"] == ["E"]
    assert human_names({"Alphabetic": "Cher"})[0] == {
        "use": "official",
        "text": "Cher",
        "family": "Cher",
    }


# --- patient ids and identifiers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("patient_id", "issuer", "plain"),
    [
        ("PAT-001", None, True),
        ("12.34", None, True),
        ("PAT-001", "HOSP_A", False),
        ("with space", None, False),
        ("under_score", None, False),
        ("x.looks-encoded", None, False),
        ("Müller", None, False),
        ("1" * 64, None, True),
        ("", "1.2.3", False),
    ],
)
def test_patient_resource_id_round_trip(patient_id: str, issuer: str | None, plain: bool) -> None:
    resource_id = patient_resource_id(patient_id, issuer)
    assert resource_id is not None
    assert (resource_id == patient_id) is plain
    if not plain:
        assert resource_id.startswith("x.")
    assert len(resource_id) <= 64
    Patient.model_validate({"resourceType": "Patient", "id": resource_id})
    if patient_id:
        assert parse_patient_resource_id(resource_id) == (patient_id, issuer)


def test_patient_resource_id_too_long_is_none() -> None:
    assert patient_resource_id("P" * 40, "a-long-issuer-of-patient-id") is None
    assert patient_resource_id("P" * 65, None) is None


@pytest.mark.parametrize(
    "bad",
    ["", "has space", "x.!!", "x.MFRGG", "x.mfrgg", "x.", "a" * 65, "x.0189"],
)
def test_parse_patient_resource_id_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_patient_resource_id(bad)


@pytest.mark.parametrize(
    ("issuer", "system", "assigner"),
    [
        (None, DEFAULT_SYSTEM, None),
        ("HOSP_A", "http://hospital-a.example.org/mrn", None),
        ("http://hospital-b.example.org/ids", "http://hospital-b.example.org/ids", None),
        ("1.2.840.99999.1", "urn:oid:1.2.840.99999.1", None),
        ("Clinic Z", DEFAULT_SYSTEM, "Clinic Z"),
    ],
)
def test_patient_identifier_systems(issuer: str | None, system: str, assigner: str | None) -> None:
    identifier = patient_identifier("P1", issuer, CTX)
    assert identifier["system"] == system
    assert identifier["value"] == "P1"
    assert identifier["type"]["coding"][0]["code"] == "MR"
    assert identifier.get("assigner", {}).get("display") == assigner
    Patient.model_validate({"resourceType": "Patient", "identifier": [identifier]})


def test_identifier_system_to_issuer() -> None:
    assert identifier_system_to_issuer(DEFAULT_SYSTEM, CTX) == (True, None)
    assert identifier_system_to_issuer("http://hospital-a.example.org/mrn", CTX) == (
        True,
        "HOSP_A",
    )
    assert identifier_system_to_issuer("urn:oid:1.2.840.99999.1", CTX) == (True, "1.2.840.99999.1")
    assert identifier_system_to_issuer("http://b.example.org/ids", CTX) == (
        True,
        "http://b.example.org/ids",
    )
    assert identifier_system_to_issuer("not-a-uri", CTX) == (False, None)


def test_patient_from_dicom() -> None:
    patient = patient_from_dicom(study_json(), CTX)
    assert patient is not None
    Patient.model_validate(patient)
    assert patient["id"] == "PAT-001"
    assert patient["gender"] == "male"
    assert patient["birthDate"] == "1980-01-02"
    assert patient["name"][0]["family"] == "Müller"


def test_patient_from_dicom_odd_values() -> None:
    ds = study_json(
        **{
            "00100021": element("LO", "Clinic Z"),
            "00100010": element("PN", {"Alphabetic": "^^^"}),
            "00100030": element("DA", "1980"),
            "00100040": element("CS", "X"),
        }
    )
    patient = patient_from_dicom(ds, CTX)
    assert patient is not None
    Patient.model_validate(patient)
    assert patient["id"].startswith("x.")
    assert parse_patient_resource_id(patient["id"]) == ("PAT-001", "Clinic Z")
    assert set(patient) == {"resourceType", "id", "text", "identifier"}
    assert patient_from_dicom(study_json(**{"00100020": element("LO")}), CTX) is None
    assert patient_from_dicom({}, CTX) is None


# --- terminology ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body_part", "code", "display"),
    [
        ("HEAD", "69536005", "Head"),
        ("BRAIN", "12738006", "Brain"),
        ("CHEST", "816094009", "Chest"),
        ("ABDOMEN", "818981001", "Abdomen"),
        ("KNEE", "72696002", "Knee"),
        ("lspine ", "122496007", "Lumbar spine"),
        ("WHOLEBODY", "38266002", "Entire body"),
    ],
)
def test_body_site_coding(body_part: str, code: str, display: str) -> None:
    assert body_site_coding(body_part) == {
        "system": "http://snomed.info/sct",
        "code": code,
        "display": display,
    }


def test_unmapped_codes_are_none() -> None:
    assert body_site_coding("NOT A BODY PART") is None
    assert body_site_coding("") is None
    assert body_site_coding(None) is None
    assert laterality_coding("U") is None
    assert laterality_coding("X") is None


@pytest.mark.parametrize(("laterality", "code"), [("R", "419465000"), ("L", "419161000"), ("B", "51440002")])
def test_laterality_coding(laterality: str, code: str) -> None:
    coding = laterality_coding(laterality)
    assert coding is not None
    assert coding["system"] == "http://snomed.info/sct" and coding["code"] == code


@pytest.mark.parametrize("map_id", ["dicom-body-part-to-snomed", "dicom-laterality-to-snomed"])
def test_concept_maps_are_valid_r4(map_id: str) -> None:
    resource = concept_map(map_id)
    ConceptMap.model_validate(resource)
    assert resource["url"] == f"http://fhir-facade.org/fhir/ConceptMap/{map_id}"
    assert resource["status"] == "active"


def test_body_part_map_covers_common_terms() -> None:
    common = [
        "HEAD",
        "BRAIN",
        "SKULL",
        "NECK",
        "CHEST",
        "THORAX",
        "ABDOMEN",
        "PELVIS",
        "ABDOMENPELVIS",
        "CHESTABDOMEN",
        "SPINE",
        "CSPINE",
        "TSPINE",
        "LSPINE",
        "SSPINE",
        "HEART",
        "BREAST",
        "KNEE",
        "SHOULDER",
        "HIP",
        "ANKLE",
        "ELBOW",
        "WRIST",
        "HAND",
        "FOOT",
        "EXTREMITY",
        "LUNG",
        "LIVER",
        "KIDNEY",
        "PROSTATE",
        "WHOLEBODY",
    ]
    assert [term for term in common if body_site_coding(term) is None] == []


# --- endpoints --------------------------------------------------------------------------------


def test_endpoints_validate() -> None:
    resources = endpoints(CTX)
    assert [r["id"] for r in resources] == ["dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs"]
    for resource in resources:
        Endpoint.model_validate(resource)
        assert resource["address"] == "http://pacs.example.org/dicom-web"
        assert resource["connectionType"]["code"] == resource["id"]
    assert resources[1]["payloadMimeType"] == ["application/dicom+json"]


# --- ImagingStudy -----------------------------------------------------------------------------


def full_study() -> dict[str, Any]:
    series = [
        series_json(
            SERIES_2,
            2,
            "SR",
            **{
                "00080021": element("DA", "20240316"),
                "00080031": element("TM", "0815"),
                "00201209": element("IS", 1),
            },
        ),
        series_json(
            SERIES_1,
            1,
            "MR",
            **{
                "00180015": element("CS", "HEAD"),
                "00200060": element("CS", "R"),
                "00201209": element("IS", "2"),
                "00080201": element("SH", "-0400"),
                "00080021": element("DA", "20240315"),
                "00080031": element("TM", "143100"),
            },
        ),
    ]
    instances = [
        instance_json(SERIES_1, 2),
        instance_json(SERIES_1, 1),
        instance_json(SERIES_2, 1, sop_class="1.2.840.10008.5.1.4.1.1.88.22"),
        instance_json(SERIES_2, 2, sop_class=None),  # skipped: sopClass is 1..1
    ]
    return imaging_study_from_dicom(study_json(), series, instances, CTX)


def test_imaging_study_full_mapping() -> None:
    resource = full_study()
    validate_study(resource)
    assert resource["id"] == STUDY_UID
    assert resource["status"] == "available"
    assert resource["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}
    accession = resource["identifier"][1]
    assert accession["value"] == "ACC-42"
    assert accession["type"]["coding"][0]["code"] == "ACSN"
    assert resource["started"] == "2024-03-15T14:30:05.25+05:30"
    assert [m["code"] for m in resource["modality"]] == ["MR", "SR"]
    assert resource["modality"][0]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
    assert resource["description"] == "MRT Schädel nativ"
    assert resource["referrer"] == {"display": "Dr. Gregory House"}
    assert resource["subject"]["reference"] == "Patient/PAT-001"
    assert resource["subject"]["identifier"]["system"] == DEFAULT_SYSTEM
    assert resource["subject"]["display"] == "Hans Müller"
    assert resource["numberOfSeries"] == 2 and resource["numberOfInstances"] == 3
    assert resource["endpoint"] == [{"reference": "Endpoint/dicom-wado-rs"}]

    first, second = resource["series"]
    assert first["uid"] == SERIES_1 and first["number"] == 1
    assert first["modality"]["code"] == "MR"
    assert first["bodySite"]["code"] == "69536005"
    assert first["laterality"]["code"] == "419465000"
    assert first["started"] == "2024-03-15T14:31:00-04:00"  # series offset wins
    assert first["numberOfInstances"] == 2
    assert [i["number"] for i in first["instance"]] == [1, 2]
    assert first["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": f"urn:oid:{MR_STORAGE}",
    }
    assert second["started"] == "2024-03-16T08:15:00+05:30"  # study offset
    assert [i["uid"] for i in second["instance"]] == [f"{SERIES_2}.1"]
    assert "bodySite" not in second and "laterality" not in second


def test_imaging_study_minimal_and_empty_values() -> None:
    study = {
        "0020000D": element("UI", STUDY_UID),
        "00080020": element("DA"),
        "00080030": element("TM", "1230"),
        "00080050": element("SH"),
        "00081030": element("LO", "   "),
        "00080090": element("PN", {"Alphabetic": "^^^"}),
        "00100010": element("PN"),
        "00100020": element("LO"),
    }
    resource = imaging_study_from_dicom(study, [], None, CTX)
    validate_study(resource)
    assert resource["subject"] == {"display": "unknown patient"}
    for absent in ("started", "description", "referrer", "modality", "series", "numberOfSeries"):
        assert absent not in resource
    assert len(resource["identifier"]) == 1


def test_imaging_study_counts_and_series_from_instances() -> None:
    study = study_json()
    del study["00201206"], study["00201208"], study["00080061"]
    series = [
        series_json(SERIES_2, None, None),  # no number, no modality
        series_json(SERIES_1, "7", "CT", **{"00180015": element("CS", "UNKNOWNPART")}),
    ]
    only_in_instances = "1.2.826.0.1.3680043.8.498.1.9"
    instances = [
        instance_json(SERIES_1, 3),
        instance_json(SERIES_1, None),
        instance_json(only_in_instances, 1),
    ]
    resource = imaging_study_from_dicom(study, series, instances, CTX)
    validate_study(resource)
    uids = [s["uid"] for s in resource["series"]]
    # numbered series first, then by uid
    assert uids == [SERIES_1, SERIES_2, only_in_instances]
    ct = resource["series"][0]
    assert ct["number"] == 7 and "bodySite" not in ct
    assert [i.get("number") for i in ct["instance"]] == [3, None]
    assert resource["series"][1]["modality"]["code"] == "OT"
    assert resource["series"][1]["numberOfInstances"] == 0
    assert resource["series"][2]["numberOfInstances"] == 1
    assert resource["numberOfSeries"] == 3
    assert resource["numberOfInstances"] == 3
    assert [m["code"] for m in resource["modality"]] == ["CT", "OT"]


def test_imaging_study_counts_from_series_without_instances() -> None:
    study = study_json()
    del study["00201208"]
    series = [
        series_json(SERIES_1, 1, "MR", **{"00201209": element("IS", 4)}),
        series_json(SERIES_2, 2, "MR", **{"00201209": element("IS", "5")}),
    ]
    resource = imaging_study_from_dicom(study, series, None, CTX)
    validate_study(resource)
    assert resource["numberOfInstances"] == 9
    assert all("instance" not in s for s in resource["series"])


def test_imaging_study_accession_issuer_and_encoded_subject() -> None:
    issuer_item = {
        "00400031": element("UT", "RIS"),
        "00400032": element("UT", "1.2.840.99999.2"),
        "00400033": element("CS", "ISO"),
    }
    study = study_json(
        **{
            "00080051": element("SQ", issuer_item),
            "00100021": element("LO", "HOSP_A"),
            "00100010": element("PN", {"Alphabetic": "山田^太郎", "Ideographic": "山田^太郎"}),
        }
    )
    resource = imaging_study_from_dicom(study, [], None, CTX)
    validate_study(resource)
    accession = resource["identifier"][1]
    assert accession["system"] == "urn:oid:1.2.840.99999.2"
    assert accession["assigner"] == {"display": "RIS"}
    subject = resource["subject"]
    assert subject["reference"].startswith("Patient/x.")
    assert subject["identifier"]["system"] == "http://hospital-a.example.org/mrn"
    assert subject["display"] == "太郎 山田"


def test_imaging_study_subject_without_resolvable_id() -> None:
    study = study_json(**{"00100020": element("LO", "P" * 60), "00100021": element("LO", "X")})
    resource = imaging_study_from_dicom(study, [], None, CTX)
    validate_study(resource)
    assert "reference" not in resource["subject"]
    assert resource["subject"]["identifier"]["value"] == "P" * 60


@pytest.mark.parametrize("uid", [None, "1.2.3_4", "1" * 65])
def test_imaging_study_rejects_bad_study_uid(uid: str | None) -> None:
    study = study_json(**{"0020000D": element("UI", uid) if uid else element("UI")})
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        imaging_study_from_dicom(study, [], None, CTX)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"])
def test_pydicom_test_files_map_to_valid_resources(name: str) -> None:
    """Real files' headers through Dataset.to_json_dict(), as Orthanc would serve them."""
    path = pydicom.data.get_testdata_file(name)
    assert isinstance(path, str)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    as_json = ds.to_json_dict()
    study = {k: v for k, v in as_json.items() if k[:4] in ("0008", "0010", "0020")}
    resource = imaging_study_from_dicom(study, [as_json], [as_json], CTX)
    validate_study(resource)
    patient = patient_from_dicom(study, CTX)
    if patient is not None:
        Patient.model_validate(patient)
    if name == "CT_small.dcm":
        assert resource["started"] == "2004-01-19T07:27:30-05:00"
        assert resource["series"][0]["instance"][0]["sopClass"]["code"] == (
            "urn:oid:1.2.840.10008.5.1.4.1.1.2"
        )


def test_pydicom_dataset_with_non_ascii_name() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID = STUDY_UID
    ds.PatientID = "Ü 1"
    ds.PatientName = "Müller^Hans=山田^太郎=やまだ^たろう"
    ds.StudyDate = "20240331"
    ds.StudyTime = "023000"  # does not exist in Berlin (DST gap): still a valid dateTime
    resource = imaging_study_from_dicom(ds.to_json_dict(), [], None, CTX)
    validate_study(resource)
    assert resource["started"].startswith("2024-03-31T02:30:00+0")
    patient = patient_from_dicom(ds.to_json_dict(), CTX)
    assert patient is not None
    Patient.model_validate(patient)
    assert [n["text"] for n in patient["name"]] == ["Hans Müller", "山田 太郎", "やまだ たろう"]
    assert parse_patient_resource_id(patient["id"]) == ("Ü 1", None)


# --- narratives (ADR 0019) ----------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script> & Co"


def test_imaging_study_narrative_summarises_the_study() -> None:
    resource = full_study()
    validate_study(resource)
    narrative_text(
        resource,
        "Imaging study MRT Schädel nativ, MR, SR, 2024-03-15T14:30:05.25+05:30.",
        "Patient Hans Müller (Patient/PAT-001)",
        "Accession number ACC-42",
        "Series 2",
        "Instances 3",
        "Referring physician",
        f"Study Instance UID {STUDY_UID}",
    )


def test_narratives_escape_hostile_dicom_values() -> None:
    study = study_json(
        **{"00081030": element("LO", HOSTILE), "00100010": element("PN", {"Alphabetic": HOSTILE})}
    )
    resource = imaging_study_from_dicom(study, [], None, CTX)
    validate_study(resource)
    assert "<script" not in resource["text"]["div"]
    narrative_text(resource, f"Imaging study {HOSTILE}", f"Patient {HOSTILE}")
    patient = patient_from_dicom(study, CTX)
    assert patient is not None
    Patient.model_validate(patient)
    assert "<script" not in patient["text"]["div"]
    narrative_text(patient, f"Name {HOSTILE}", "Patient ID PAT-001", "Birth date 1980-01-02", "Sex male")


def test_endpoint_narrative_names_connection_type_and_address() -> None:
    for resource in endpoints(CTX):
        narrative_text(
            resource, f"Connection type {resource['id']}", "Address http://pacs.example.org/dicom-web"
        )
