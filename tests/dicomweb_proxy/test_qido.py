"""QIDO-RS through the proxy against the real Orthanc: unconfined callers get Orthanc's answer with its
links naming the proxy, a patient/ token sees its patient's studies, series and instances only,
whatever the client puts in the query."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fhir_facade.dicom_to_fhir.patient import patient_resource_id
from tests.conftest import outcome
from tests.dicom_factory import CORPUS, series_instance_uid
from tests.dicomweb_proxy.conftest import caller, relinked

MUELLER_MR = CORPUS["mueller_mr_brain"].study_uid  # P-1001
MUELLER_CT = CORPUS["mueller_ct_chest"].study_uid  # P-1001
YAMADA = CORPUS["yamada_mr"].study_uid  # JP-0042
ISSUER_CT = CORPUS["issuer_ct"].study_uid  # MRN-555 issued by HOSPITAL-A
MUELLER_SERIES = series_instance_uid(MUELLER_MR, 1)
DICOM_JSON = {"Accept": "application/dicom+json"}
P1001 = caller("patient/ImagingStudy.rs", "P-1001")


def values(response: httpx.Response, tag: str) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert isinstance(body, list)
    return [ds.get(tag, {}).get("Value", [None])[0] for ds in body]


@pytest.mark.parametrize(
    "target",
    [
        "/studies",
        "/studies?PatientID=P-1001",
        "/studies?PatientName=M*&includefield=00081030",
        "/series?Modality=CT",
        f"/instances?StudyInstanceUID={MUELLER_MR}",
        f"/studies/{MUELLER_MR}/series",
        f"/studies/{MUELLER_MR}/instances",
        f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances?includefield=00200013",
    ],
)
def test_unrestricted_caller_gets_orthancs_answer_with_proxy_links(
    proxy: httpx.Client, direct: httpx.Client, target: str
) -> None:
    ours = proxy.get(target, headers=DICOM_JSON)
    theirs = direct.get(target.lstrip("/"), headers=DICOM_JSON)
    assert ours.status_code == theirs.status_code == 200
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    assert ours.content == relinked(direct, proxy, theirs.content)
    assert ours.json()  # not vacuous: every query above matches something


# Raw query strings: Orthanc reads "*" as a wildcard but "%2A" (what httpx's params= would send)
# literally, so these are written as a client that means them would send them.
@pytest.mark.parametrize(
    "query",
    [
        "",
        "PatientID=JP-0042",
        "PatientID=*",
        "PatientID=P-1001,JP-0042",
        "PatientID=P-1001%2CJP-0042",
        "00100020=JP-0042",
        "0010,0020=*",
        "patientid=JP-0042",
        # Orthanc lets the LAST repeated key win: appending ours would lose to the client's.
        "PatientID=P-1001&PatientID=JP-0042",
        "PatientID=P-1001&00100020=*",
        "IssuerOfPatientID=HOSPITAL-A&PatientID=MRN-555",
        "PatientID=*&limit=100&includefield=00100021",
    ],
)
def test_patient_token_sees_only_its_studies_whatever_the_query(proxy: httpx.Client, query: str) -> None:
    response = proxy.get(f"/studies?{query}", headers=P1001)
    assert sorted(values(response, "0020000D")) == sorted([MUELLER_MR, MUELLER_CT])
    assert set(values(response, "00100020")) == {"P-1001"}


def test_the_same_queries_widen_an_unconfined_answer(direct: httpx.Client) -> None:
    """What those query keys do at Orthanc itself, so the test above is not vacuous."""
    later_wins = direct.get("studies?PatientID=P-1001&PatientID=JP-0042")
    assert values(later_wins, "00100020") == ["JP-0042"]
    assert values(direct.get("studies?00100020=JP-0042"), "00100020") == ["JP-0042"]
    assert len(values(direct.get("studies?0010,0020=*"), "0020000D")) > 2
    assert set(values(direct.get("studies?PatientID=P-1001%2CJP-0042"), "00100020")) == {"P-1001", "JP-0042"}


def test_patient_token_root_series_and_instances_are_confined(
    proxy: httpx.Client, direct: httpx.Client
) -> None:
    for level, uid_tag in (("/series", "0020000E"), ("/instances", "00080018")):
        ours = proxy.get(f"{level}?PatientID=*", headers=P1001)
        expected = direct.get(level, params={"PatientID": "P-1001"})
        assert sorted(values(ours, uid_tag)) == sorted(values(expected, uid_tag))
        assert set(values(ours, "00100020")) == {"P-1001"}
        assert len(values(direct.get(level), uid_tag)) > len(values(ours, uid_tag))
    assert len(values(proxy.get("/series", headers=P1001), "0020000E")) == 4  # 3 MR + 1 CT
    assert len(values(proxy.get("/instances", headers=P1001), "00080018")) == 11


def test_patient_token_cannot_reach_another_study_by_uid(proxy: httpx.Client) -> None:
    by_uid = proxy.get(f"/studies?StudyInstanceUID={YAMADA}&PatientID=*", headers=P1001)
    assert values(by_uid, "0020000D") == []
    series = proxy.get("/series", params={"StudyInstanceUID": YAMADA}, headers=P1001)
    assert values(series, "0020000E") == []


@pytest.mark.parametrize("suffix", ["/series", "/instances"])
def test_study_scoped_search_of_another_patients_study_finds_nothing(
    proxy: httpx.Client, direct: httpx.Client, suffix: str
) -> None:
    foreign = proxy.get(f"/studies/{YAMADA}{suffix}", headers=P1001)
    assert foreign.status_code == 200
    assert foreign.json() == []
    # ...which is what Orthanc answers for a study it does not hold, so nothing is revealed.
    unknown = direct.get(f"/studies/1.2.3.4.5.6{suffix}")
    assert unknown.status_code == 200 and unknown.json() == []
    assert values(direct.get(f"/studies/{YAMADA}{suffix}"), "00100020")  # Orthanc has it
    own = proxy.get(f"/studies/{MUELLER_MR}{suffix}", headers=P1001)
    assert values(own, "0020000D") == values(direct.get(f"/studies/{MUELLER_MR}{suffix}"), "0020000D")
    assert values(own, "0020000D")


def test_series_instances_of_own_study(proxy: httpx.Client, direct: httpx.Client) -> None:
    path = f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances"
    ours = proxy.get(path, headers=P1001)
    assert sorted(values(ours, "00080018")) == sorted(values(direct.get(path), "00080018"))
    assert len(values(ours, "00080018")) == 3


def test_issuer_is_part_of_the_patient(proxy: httpx.Client, direct: httpx.Client) -> None:
    with_issuer = patient_resource_id("MRN-555", "HOSPITAL-A")
    assert with_issuer is not None
    ours = proxy.get("/studies", headers=caller("patient/ImagingStudy.rs", with_issuer))
    assert values(ours, "0020000D") == [ISSUER_CT]
    assert values(ours, "00100021") == ["HOSPITAL-A"]
    # The same PatientID without an issuer is another Patient: Orthanc matches the PatientID
    # (an empty issuer is a universal match in QIDO), so the answer filter drops the study.
    assert values(direct.get("/studies", params={"PatientID": "MRN-555"}), "0020000D") == [ISSUER_CT]
    no_issuer = proxy.get("/studies", headers=caller("patient/ImagingStudy.rs", "MRN-555"))
    assert values(no_issuer, "0020000D") == []
    wrong_issuer = patient_resource_id("MRN-555", "HOSPITAL-B")
    assert wrong_issuer is not None
    other = proxy.get("/series", headers=caller("patient/ImagingStudy.rs", wrong_issuer))
    assert values(other, "0020000E") == []


def test_v1_patient_scope_is_confined_too(proxy: httpx.Client) -> None:
    response = proxy.get("/studies", headers=caller("patient/ImagingStudy.read", "P-1001"))
    assert sorted(values(response, "0020000D")) == sorted([MUELLER_MR, MUELLER_CT])


def test_user_scope_is_not_confined(proxy: httpx.Client, direct: httpx.Client) -> None:
    """A user/ grant lifts the confinement even when the token carries a patient context."""
    for scope in ("user/ImagingStudy.rs", "patient/ImagingStudy.rs user/ImagingStudy.s", "system/*.rs"):
        ours = proxy.get("/studies", headers=caller(scope, "P-1001"))
        assert ours.status_code == 200
        assert ours.content == relinked(direct, proxy, direct.get("/studies").content)
        assert len(ours.json()) > 2


@pytest.mark.parametrize(
    "scope",
    ["patient/Observation.rs", "patient/ImagingStudy.r", "user/ImagingStudy.c", "openid fhirUser"],
)
def test_search_without_s_on_imaging_study_is_forbidden(proxy: httpx.Client, scope: str) -> None:
    response = proxy.get("/studies", headers=caller(scope, "P-1001"))
    body = outcome(response, 403, "forbidden")
    assert body["issue"][0]["details"]["coding"][0]["code"] == "insufficient_scope"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="insufficient_scope"' in challenge
    assert "ImagingStudy.rs" in challenge


def test_patient_scope_without_patient_context_is_forbidden(proxy: httpx.Client) -> None:
    response = proxy.get("/studies", headers=caller("patient/ImagingStudy.rs"))
    outcome(response, 403, "forbidden")


def test_confined_search_must_accept_dicom_json(proxy: httpx.Client) -> None:
    xml = {**P1001, "Accept": 'multipart/related; type="application/dicom+xml"'}
    outcome(proxy.get("/studies", headers=xml), 406, "not-supported")
    for accept in ("application/json", "application/dicom+json, */*;q=0.1", "*/*"):
        assert proxy.get("/studies", headers={**P1001, "Accept": accept}).status_code == 200


def test_bad_uid_in_path_is_a_bad_request(proxy: httpx.Client) -> None:
    for path in ("/studies/1.2.*/series", "/studies/1.2,1.3/instances", "/studies/1..2/series"):
        outcome(proxy.get(path), 400, "invalid")
