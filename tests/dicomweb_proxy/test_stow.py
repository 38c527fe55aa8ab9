"""STOW-RS through the proxy against a real Orthanc (the tests' own, since stores change it): the
instances reach the PACS re-encoded when allowed; a patient/ token stores its patient's instances
only. Framing attacks on the multipart body: test_stow_framing.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from pydicom.uid import generate_uid

from fhir_facade.dicom_to_fhir.patient import patient_resource_id
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from tests.conftest import outcome
from tests.dicom_factory import CORPUS_ROOT, to_bytes
from tests.dicomweb_proxy.conftest import (
    SCRATCH_MAX_STOW_BYTES,
    caller,
    multipart,
    new_study,
    relinked,
    stow_body,
)

JSON = {"Accept": "application/dicom+json"}
REFERENCED_SOP_SEQUENCE = "00081199"
STORE = "patient/ImagingStudy.crs"


def stored_sops(direct: httpx.Client, study_uid: str) -> set[str]:
    """The SOP Instance UIDs Orthanc holds in the study (asked directly, not through the proxy)."""
    response = direct.get(f"/studies/{study_uid}/instances")
    assert response.status_code == 200
    return {ds["00080018"]["Value"][0] for ds in response.json()}


def referenced(response: httpx.Response) -> set[str]:
    items = response.json().get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    return {item["00081155"]["Value"][0] for item in items}


def test_unrestricted_store_is_answered_as_orthanc_answers_with_proxy_links(
    scratch_proxy: httpx.Client, scratch_direct: httpx.Client
) -> None:
    study = new_study("PROXY-U")
    body, content_type = stow_body(study)
    ours = scratch_proxy.post("/studies", content=body, headers={**JSON, "Content-Type": content_type})
    assert ours.status_code == 200, ours.text
    assert referenced(ours) == {str(ds.SOPInstanceUID) for ds in study}
    assert stored_sops(scratch_direct, str(study[0].StudyInstanceUID)) == referenced(ours)
    # Orthanc answers a repeated store of the same bytes the same way: so does the proxy.
    theirs = scratch_direct.post("/studies", content=body, headers={**JSON, "Content-Type": content_type})
    assert theirs.status_code == ours.status_code
    assert theirs.headers["content-type"] == ours.headers["content-type"]
    assert json.loads(relinked(scratch_direct, scratch_proxy, theirs.content)) == ours.json()
    assert theirs.json() != ours.json()  # the RetrieveURLs name the proxy (ADR 0016)


def test_patient_token_stores_its_own_instances(
    scratch_proxy: httpx.Client, scratch_direct: httpx.Client
) -> None:
    study = new_study("PROXY-A")
    study_uid = str(study[0].StudyInstanceUID)
    body, content_type = stow_body(study)
    headers = {**caller(STORE, "PROXY-A"), **JSON, "Content-Type": content_type}
    response = scratch_proxy.post(f"/studies/{study_uid}", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert stored_sops(scratch_direct, study_uid) == {str(ds.SOPInstanceUID) for ds in study}


def test_patient_token_cannot_store_another_patients_instance(
    scratch_proxy: httpx.Client, scratch_direct: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    own, other = new_study("PROXY-A"), new_study("PROXY-B")
    mixed = [own[0], other[0]]  # one foreign instance refuses the whole request
    for datasets, refused in ((other, 1), (mixed, 2)):
        body, content_type = stow_body(datasets)
        headers = {**caller(STORE, "PROXY-A"), "Content-Type": content_type}
        with caplog.at_level("INFO", logger="fhir_facade.dicomweb_proxy"):
            response = scratch_proxy.post("/studies", content=body, headers=headers)
        diagnostics = outcome(response, 403, "forbidden")["issue"][0]["diagnostics"]
        assert f"instance {refused} may not be stored for patient PROXY-A" in diagnostics
        assert "PROXY-B" not in diagnostics
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert stored_sops(scratch_direct, str(own[0].StudyInstanceUID)) == set()
    assert stored_sops(scratch_direct, str(other[0].StudyInstanceUID)) == set()
    refusals = [r for r in caplog.records if "refused POST /dicom-web/studies" in r.getMessage()]
    assert len(refusals) == 2
    assert all(r.levelname == "INFO" and "may not be stored" in r.getMessage() for r in refusals)


def test_issuer_must_match_too(scratch_proxy: httpx.Client, scratch_direct: httpx.Client) -> None:
    patient = patient_resource_id("PROXY-I", "HOSPITAL-X")
    assert patient is not None
    headers = caller(STORE, patient)
    no_issuer = new_study("PROXY-I")
    body, content_type = stow_body(no_issuer)
    outcome(
        scratch_proxy.post("/studies", content=body, headers={**headers, "Content-Type": content_type}),
        403,
        "forbidden",
    )
    assert stored_sops(scratch_direct, str(no_issuer[0].StudyInstanceUID)) == set()
    with_issuer = new_study("PROXY-I", issuer="HOSPITAL-X")
    body, content_type = stow_body(with_issuer)
    response = scratch_proxy.post("/studies", content=body, headers={**headers, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert len(stored_sops(scratch_direct, str(with_issuer[0].StudyInstanceUID))) == 2


@pytest.mark.parametrize("level", ["study", "series", "sop"])
def test_patient_token_cannot_store_under_another_patients_uid(
    scratch_orthanc: EmbeddedOrthanc, scratch_proxy: httpx.Client, scratch_direct: httpx.Client, level: str
) -> None:
    """Orthanc keys data by patient and UID: an instance of ours under another patient's study,
    series or SOP instance UID would make that patient's data ambiguous (unretrievable)."""
    theirs = new_study("PROXY-B")
    with httpx.Client(timeout=30) as client:
        store_instances(client, scratch_orthanc.url, theirs)
    ours = new_study("PROXY-A")[:1]
    ds = ours[0]
    if level == "study":
        ds.StudyInstanceUID = theirs[0].StudyInstanceUID
    elif level == "series":
        ds.SeriesInstanceUID = theirs[0].SeriesInstanceUID
    else:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = theirs[0].SOPInstanceUID
    body, content_type = stow_body(ours)
    response = scratch_proxy.post(
        "/studies", content=body, headers={**caller(STORE, "PROXY-A"), "Content-Type": content_type}
    )
    diagnostics = outcome(response, 403, "forbidden")["issue"][0]["diagnostics"]
    assert "instance 1 may not be stored for patient PROXY-A" in diagnostics
    taken = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID}[level]
    assert str(taken) not in diagnostics  # the other patient's UID is not echoed
    # Orthanc itself would have taken it (and made PROXY-B's data ambiguous).
    assert stored_sops(scratch_direct, str(theirs[0].StudyInstanceUID)) == {
        str(d.SOPInstanceUID) for d in theirs
    }
    assert (
        scratch_direct.get(f"/studies?PatientID=PROXY-A&StudyInstanceUID={ds.StudyInstanceUID}").json() == []
    )


def test_store_needs_c_on_imaging_study(scratch_proxy: httpx.Client, scratch_direct: httpx.Client) -> None:
    study = new_study("PROXY-A")
    body, content_type = stow_body(study)
    for scope in ("patient/ImagingStudy.rs", "user/DiagnosticReport.c"):
        response = scratch_proxy.post(
            "/studies", content=body, headers={**caller(scope, "PROXY-A"), "Content-Type": content_type}
        )
        outcome(response, 403, "forbidden")
        assert "ImagingStudy.c" in response.headers["www-authenticate"]
    assert stored_sops(scratch_direct, str(study[0].StudyInstanceUID)) == set()


def test_user_scope_stores_any_patient(scratch_proxy: httpx.Client, scratch_direct: httpx.Client) -> None:
    study = new_study("PROXY-B")
    body, content_type = stow_body(study)
    headers = {**caller("user/ImagingStudy.c", "PROXY-A"), "Content-Type": content_type}
    assert scratch_proxy.post("/studies", content=body, headers=headers).status_code == 200
    assert len(stored_sops(scratch_direct, str(study[0].StudyInstanceUID))) == 2


def test_confined_store_needs_readable_dicom_parts(scratch_proxy: httpx.Client) -> None:
    headers = caller(STORE, "PROXY-A")
    body, content_type = multipart([b"not a DICOM file at all"])
    outcome(
        scratch_proxy.post("/studies", content=body, headers={**headers, "Content-Type": content_type}),
        400,
        "invalid",
    )
    body, content_type = multipart([b"{}"], part_type="application/dicom+json")
    response = scratch_proxy.post("/studies", content=body, headers={**headers, "Content-Type": content_type})
    outcome(response, 415, "not-supported")
    response = scratch_proxy.post(
        "/studies", content=b"x", headers={**headers, "Content-Type": "application/dicom"}
    )
    outcome(response, 415, "not-supported")


def test_body_over_the_limit_is_413(scratch_proxy: httpx.Client, scratch_direct: httpx.Client) -> None:
    study = new_study("PROXY-A")
    part = to_bytes(study[0])
    copies = SCRATCH_MAX_STOW_BYTES // len(part) + 2
    datasets = []
    for _ in range(copies):
        ds = study[0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(CORPUS_ROOT)
        datasets.append(to_bytes(ds))
    body, content_type = multipart(datasets)
    assert len(body) > SCRATCH_MAX_STOW_BYTES
    for headers in ({}, caller(STORE, "PROXY-A")):
        response = scratch_proxy.post(
            "/studies", content=body, headers={**headers, "Content-Type": content_type}
        )
        outcome(response, 413, "too-long")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is applied while reading
        for start in range(0, len(body), 16384):
            yield body[start : start + 16384]

    response = scratch_proxy.post("/studies", content=chunked(), headers={"Content-Type": content_type})
    assert "content-length" not in response.request.headers
    outcome(response, 413, "too-long")
    assert stored_sops(scratch_direct, str(study[0].StudyInstanceUID)) == set()


def test_pacs_refusal_passes_through(scratch_proxy: httpx.Client, scratch_direct: httpx.Client) -> None:
    """Orthanc answers 409 for an instance outside the study named in the URL: the client sees it."""
    study = new_study("PROXY-A")
    body, content_type = stow_body(study)
    path = f"/studies/{generate_uid(CORPUS_ROOT)}"
    ours = scratch_proxy.post(
        path, content=body, headers={**caller(STORE, "PROXY-A"), **JSON, "Content-Type": content_type}
    )
    theirs = scratch_direct.post(path, content=body, headers={**JSON, "Content-Type": content_type})
    assert ours.status_code == theirs.status_code == 409
    assert ours.content == theirs.content
