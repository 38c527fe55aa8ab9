"""WADO-RS through the proxy against the real Orthanc: unconfined callers get Orthanc's bytes, a
patient/ token reads its own studies and gets 404 for any other, however it is addressed."""

from __future__ import annotations

import httpx
import pytest
from pydicom.uid import generate_uid

from fhir_facade.dicomweb.wado import ACCEPT_DICOM_AS_STORED, parse_multipart_related
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from tests.conftest import outcome
from tests.dicom_factory import CORPUS, CORPUS_ROOT, series_instance_uid, sop_instance_uid
from tests.dicomweb_proxy.conftest import caller, new_study, relinked

MUELLER_MR = CORPUS["mueller_mr_brain"].study_uid  # P-1001
MUELLER_SERIES = series_instance_uid(MUELLER_MR, 1)
MUELLER_INSTANCE = sop_instance_uid(MUELLER_SERIES, 1)
YAMADA = CORPUS["yamada_mr"].study_uid  # JP-0042
YAMADA_SERIES = series_instance_uid(YAMADA, 1)
YAMADA_INSTANCE = sop_instance_uid(YAMADA_SERIES, 1)
P1001 = caller("patient/ImagingStudy.rs", "P-1001")


def wado_paths(study: str, series: str, instance: str) -> list[str]:
    """Every WADO-RS resource of one instance, from the study down to its rendered frame."""
    return [
        f"/studies/{study}",
        f"/studies/{study}/metadata",
        f"/studies/{study}/rendered",
        f"/studies/{study}/series/{series}",
        f"/studies/{study}/series/{series}/metadata",
        f"/studies/{study}/series/{series}/rendered",
        f"/studies/{study}/series/{series}/instances/{instance}",
        f"/studies/{study}/series/{series}/instances/{instance}/metadata",
        f"/studies/{study}/series/{series}/instances/{instance}/rendered",
        f"/studies/{study}/series/{series}/instances/{instance}/thumbnail",
        f"/studies/{study}/series/{series}/instances/{instance}/frames/1",
        f"/studies/{study}/series/{series}/instances/{instance}/frames/1/rendered",
        f"/studies/{study}/series/{series}/instances/{instance}/bulk/7fe00010",
    ]


def same_representation(
    ours: httpx.Response, theirs: httpx.Response, proxy: httpx.Client, direct: httpx.Client
) -> None:
    """Equal status, media type and content (Orthanc's links naming the proxy); multipart bodies
    compared part by part (each answer has its own random boundary)."""
    assert ours.status_code == theirs.status_code, (ours.text[:300], theirs.text[:300])
    ours_type, theirs_type = ours.headers.get("content-type", ""), theirs.headers.get("content-type", "")
    if ours_type.startswith("multipart/related"):
        assert ours_type.split("boundary=")[0] == theirs_type.split("boundary=")[0]
        ours_parts = parse_multipart_related(ours.content, ours_type)
        theirs_parts = parse_multipart_related(theirs.content, theirs_type)
        assert [p.content for p in ours_parts] == [relinked(direct, proxy, p.content) for p in theirs_parts]
        assert ours_parts
    else:
        assert ours_type == theirs_type
        assert ours.content == relinked(direct, proxy, theirs.content)


@pytest.mark.parametrize("path", wado_paths(MUELLER_MR, MUELLER_SERIES, MUELLER_INSTANCE))
def test_unrestricted_caller_gets_orthancs_answer(
    proxy: httpx.Client, direct: httpx.Client, path: str
) -> None:
    same_representation(proxy.get(path), direct.get(path), proxy, direct)


def test_retrieve_answers_are_what_they_claim(proxy: httpx.Client) -> None:
    instance = f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances/{MUELLER_INSTANCE}"
    response = proxy.get(instance, headers={"Accept": ACCEPT_DICOM_AS_STORED})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    (part,) = parse_multipart_related(response.content, response.headers["content-type"])
    assert part.content[128:132] == b"DICM"
    assert MUELLER_INSTANCE.encode() in part.content
    rendered = proxy.get(f"{instance}/rendered", headers={"Accept": "image/jpeg"})
    assert rendered.headers["content-type"] == "image/jpeg"
    assert rendered.content.startswith(b"\xff\xd8")  # JPEG SOI
    metadata = proxy.get(f"{instance}/metadata", headers={"Accept": "application/dicom+json"})
    assert metadata.json()[0]["00080018"]["Value"] == [MUELLER_INSTANCE]


def test_metadata_is_gzip_encoded_for_a_client_that_accepts_it(
    proxy: httpx.Client, direct: httpx.Client
) -> None:
    """The proxy reads the metadata to rewrite its links, then encodes it again as the client asked."""
    path = f"/studies/{MUELLER_MR}/metadata"
    ours = proxy.get(path, headers={"Accept-Encoding": "gzip"})
    theirs = direct.get(path, headers={"Accept-Encoding": "gzip"})
    assert ours.headers["content-encoding"] == theirs.headers["content-encoding"] == "gzip"
    assert ours.headers["vary"] == "Accept-Encoding"
    assert ours.content == relinked(direct, proxy, theirs.content)  # httpx decoded both
    plain = proxy.get(path, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.content == ours.content


@pytest.mark.parametrize("path", wado_paths(MUELLER_MR, MUELLER_SERIES, MUELLER_INSTANCE))
def test_patient_token_reads_its_own_study(proxy: httpx.Client, direct: httpx.Client, path: str) -> None:
    same_representation(proxy.get(path, headers=P1001), direct.get(path), proxy, direct)


@pytest.mark.parametrize("path", wado_paths(YAMADA, YAMADA_SERIES, YAMADA_INSTANCE))
def test_patient_token_gets_404_for_another_patients_study(
    proxy: httpx.Client, direct: httpx.Client, path: str
) -> None:
    response = proxy.get(path, headers=P1001)
    body = outcome(response, 404, "not-found")
    assert YAMADA in body["issue"][0]["diagnostics"]
    assert "JP-0042" not in response.text
    if not path.endswith("/thumbnail"):  # Orthanc 1.10 has no thumbnails (404 for everyone)
        assert direct.get(path).status_code == 200  # Orthanc would have served it


def test_foreign_and_unknown_studies_look_the_same(proxy: httpx.Client) -> None:
    foreign = proxy.get(f"/studies/{YAMADA}/metadata", headers=P1001)
    unknown = proxy.get("/studies/1.2.3.4.5.6/metadata", headers=P1001)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["issue"][0]["code"] == unknown.json()["issue"][0]["code"]
    assert foreign.json()["issue"][0]["diagnostics"].replace(YAMADA, "X") == unknown.json()["issue"][0][
        "diagnostics"
    ].replace("1.2.3.4.5.6", "X")


def test_own_study_with_another_patients_series_is_refused_by_orthanc(proxy: httpx.Client) -> None:
    """Orthanc checks the UID hierarchy of a WADO-RS path, so checking the study is enough."""
    mixed = f"/studies/{MUELLER_MR}/series/{YAMADA_SERIES}/instances/{YAMADA_INSTANCE}"
    response = proxy.get(mixed, headers=P1001)
    assert response.status_code == 404
    assert response.json()["HttpStatus"] == 404  # Orthanc's own answer, passed through
    assert b"DICM" not in response.content


def test_unknown_study_404_from_orthanc_passes_through(proxy: httpx.Client, direct: httpx.Client) -> None:
    ours, theirs = proxy.get("/studies/1.2.3.4.5.6"), direct.get("/studies/1.2.3.4.5.6")
    assert ours.status_code == theirs.status_code == 404
    assert ours.content == theirs.content


@pytest.mark.parametrize("scope", ["patient/ImagingStudy.s", "patient/Patient.rs", "user/ImagingStudy.c"])
def test_retrieve_without_r_on_imaging_study_is_forbidden(proxy: httpx.Client, scope: str) -> None:
    response = proxy.get(f"/studies/{MUELLER_MR}/metadata", headers=caller(scope, "P-1001"))
    outcome(response, 403, "forbidden")
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


def test_read_scope_alone_retrieves_but_does_not_search(proxy: httpx.Client) -> None:
    read_only = caller("patient/ImagingStudy.r", "P-1001")
    assert proxy.get(f"/studies/{MUELLER_MR}/metadata", headers=read_only).status_code == 200
    outcome(proxy.get("/studies", headers=read_only), 403, "forbidden")


def test_user_scope_reads_any_study(proxy: httpx.Client, direct: httpx.Client) -> None:
    path = f"/studies/{YAMADA}/metadata"
    user = caller("user/ImagingStudy.rs", "P-1001")
    same_representation(proxy.get(path, headers=user), direct.get(path), proxy, direct)


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1.2.*/metadata",
        "/studies/1.2,1.3",
        f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances/{MUELLER_INSTANCE}/frames/0",
        f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances/{MUELLER_INSTANCE}/frames/1,x",
        f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances/{MUELLER_INSTANCE}/bulk/7fe00010/%2E%2E",
        f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/instances/{MUELLER_INSTANCE}/bulk/7fe0*",
        "/studies/%2E%2E/metadata",
    ],
)
def test_malformed_path_is_a_bad_request(proxy: httpx.Client, path: str) -> None:
    outcome(proxy.get(path, headers=P1001), 400, "invalid")


def test_study_uid_shared_with_another_patient_is_not_the_patients(
    scratch_orthanc: EmbeddedOrthanc, scratch_proxy: httpx.Client, scratch_direct: httpx.Client
) -> None:
    """An instance stored with the victim's StudyInstanceUID but the intruder's PatientID makes a
    second study of that UID in Orthanc, which then serves the victim's series under it by series
    UID. "StudyInstanceUID + PatientID" would pass for the intruder; the proxy wants every study of
    the UID to be the caller's."""
    victim = new_study("PROXY-VICTIM")
    study_uid = str(victim[0].StudyInstanceUID)
    victim_series = f"/studies/{study_uid}/series/{victim[0].SeriesInstanceUID}"
    intruder = new_study("PROXY-INTRUDER", study_uid=study_uid)
    intruder_series = generate_uid(CORPUS_ROOT)
    for ds in intruder:  # its own series under the victim's study UID
        ds.SeriesInstanceUID = intruder_series
    with httpx.Client(timeout=30) as client:
        store_instances(client, scratch_orthanc.url, [*victim, *intruder])

    assert scratch_direct.get(f"{victim_series}/metadata").status_code == 200  # the hole
    studies = scratch_direct.get(f"/studies?StudyInstanceUID={study_uid}&PatientID=PROXY-INTRUDER").json()
    assert len(studies) == 1  # what a check by UID + PatientID would have accepted

    as_intruder = caller("patient/ImagingStudy.rs", "PROXY-INTRUDER")
    outcome(scratch_proxy.get(f"{victim_series}/metadata", headers=as_intruder), 404, "not-found")
    outcome(scratch_proxy.get(victim_series, headers=as_intruder), 404, "not-found")
    assert scratch_proxy.get(f"/studies/{study_uid}/series", headers=as_intruder).json() == []
    # Searches by PatientID still show the intruder its own series, and nothing of the victim.
    own = scratch_proxy.get(f"/series?StudyInstanceUID={study_uid}", headers=as_intruder).json()
    assert [ds["0020000E"]["Value"][0] for ds in own] == [intruder_series]
