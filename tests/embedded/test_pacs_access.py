"""The embedded Orthanc serves only the facade and the listed modalities (ADR 0013), checked with
real peers: dcmtk `echoscu`/`findscu`/`storescu` for DICOM, httpx from another loopback address
(127.0.0.2) and without or with wrong credentials for HTTP, and the facade itself (QIDO, Orthanc
REST, DICOMweb proxy) signing in with FACADE_PACS_USERNAME/_PASSWORD."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhir_facade.dicomweb.stow import StowClient
from fhir_facade.dicomweb.wado import WadoClient
from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from tests.conftest import LiveServer, ok_json, serve
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, upload

LISTED_AET = "CT-ROOM-1"
#: Listed, but at an address the tests' connections never come from (they all leave from 127.0.0.1).
ELSEWHERE_AET = "CT-ROOM-2"
STUDY_UID = "1.2.826.0.1.3680043.8.498.13.1"


def study() -> StudySpec:
    return StudySpec(
        patient_id="ACCESS-1",
        patient_name="Wache^Ina",
        study_uid=STUDY_UID,
        accession="ACC-ACCESS-1",
        study_date="20241204",
        study_time="101500",
        description="CT HEAD",
        series=[SeriesSpec("CT", "AX", 1, n_instances=1)],
    )


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    worklists = tmp_path_factory.mktemp("access-worklists")
    instance = EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-access"),
        http_port=free_port(),
        dicom_port=free_port(),
        worklist_dir=worklists,
        modalities=[DicomPeer(LISTED_AET, "127.0.0.1"), DicomPeer(ELSEWHERE_AET, "127.0.0.2")],
    )
    with instance:
        with instance.client() as client:
            upload(client, instance.url, build_study(study()))
        yield instance


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = StudySpec(
        patient_id="ACCESS-2",
        patient_name="Sender^Sam",
        study_uid="1.2.826.0.1.3680043.8.498.13.2",
        accession="ACC-ACCESS-2",
        study_date="20241204",
        study_time="111500",
        description="CT CHEST",
        series=[SeriesSpec("CT", "AX", 1, n_instances=1)],
    )
    path = tmp_path_factory.mktemp("to-send") / "image.dcm"
    build_study(spec)[0].save_as(path, enforce_file_format=True)
    return path


def dcmtk(pacs: EmbeddedOrthanc, tool: str, calling_aet: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk SCU against the PACS as `calling_aet`, from 127.0.0.1."""
    return subprocess.run(
        [tool, "-aet", calling_aet, "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def worklist_query(pacs: EmbeddedOrthanc, calling_aet: str) -> subprocess.CompletedProcess[str]:
    return dcmtk(pacs, "findscu", calling_aet, "-W", "-k", "PatientID", "-k", "AccessionNumber")


def assert_rejected(done: subprocess.CompletedProcess[str]) -> None:
    """The association was refused (A-ASSOCIATE-RJ, PS3.8 7.1.1.9): the AE title is not known there."""
    assert done.returncode != 0, done.stderr
    assert "Rejected Permanent" in done.stderr, done.stderr
    assert "Calling AE Title Not Recognized" in done.stderr, done.stderr


@pytest.mark.parametrize("calling_aet", ["INTRUDER", ELSEWHERE_AET])
def test_dicom_refuses_unlisted_ae_titles_and_listed_ones_from_another_address(
    pacs: EmbeddedOrthanc, dicom_file: Path, calling_aet: str
) -> None:
    assert_rejected(worklist_query(pacs, calling_aet))
    assert_rejected(dcmtk(pacs, "echoscu", calling_aet))
    assert_rejected(dcmtk(pacs, "storescu", calling_aet, str(dicom_file)))
    assert_rejected(
        dcmtk(pacs, "findscu", calling_aet, "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID")
    )


def test_a_listed_modality_at_its_address_echoes_queries_the_worklist_and_stores(
    pacs: EmbeddedOrthanc, dicom_file: Path
) -> None:
    assert dcmtk(pacs, "echoscu", LISTED_AET).returncode == 0
    done = worklist_query(pacs, LISTED_AET)
    assert done.returncode == 0, done.stderr
    done = dcmtk(pacs, "storescu", LISTED_AET, str(dicom_file))
    assert done.returncode == 0, done.stderr
    with pacs.client() as client:
        stored = client.post(f"{pacs.url}/tools/lookup", content="1.2.826.0.1.3680043.8.498.13.2")
        assert [match["Type"] for match in stored.json()] == ["Study"]


def test_a_listed_modality_may_not_query_the_archive(pacs: EmbeddedOrthanc, tmp_path: Path) -> None:
    """A modality's AE title opens the worklist, not every patient's studies (AllowFind off)."""
    done = dcmtk(
        pacs,
        "findscu",
        LISTED_AET,
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID",
        "-X",
        "-od",
        str(tmp_path),
    )
    assert "Peer aborted Association" in done.stderr, done.stderr
    assert list(tmp_path.glob("rsp*.dcm")) == []


def test_dicom_refuses_a_wrong_called_ae_title(pacs: EmbeddedOrthanc) -> None:
    done = subprocess.run(
        ["echoscu", "-aet", LISTED_AET, "-aec", "NOT-ORTHANC", "127.0.0.1", str(pacs.dicom_port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stderr, done.stderr


@pytest.mark.parametrize("path", ["/system", "/patients", "/dicom-web/studies", "/app/explorer.html"])
def test_http_refuses_requests_without_the_credentials(pacs: EmbeddedOrthanc, path: str) -> None:
    assert httpx.get(f"{pacs.url}{path}", timeout=10).status_code == 401
    assert httpx.get(f"{pacs.url}{path}", auth=("fhir-facade", "guess"), timeout=10).status_code == 401
    assert httpx.get(f"{pacs.url}{path}", auth=pacs.auth, timeout=10).status_code == 200


def test_http_refuses_another_address_even_with_the_credentials(pacs: EmbeddedOrthanc) -> None:
    """Orthanc 1.10 listens on every interface; RemoteAccessAllowed=false answers anyone but
    127.0.0.1 with 401. 127.0.0.2 is loopback too, so this is the closest a one-machine test gets
    to a request from the network."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, auth=pacs.auth, timeout=10) as client:
        assert client.get(f"{pacs.url}/system").status_code == 401


def test_the_configuration_file_with_the_password_is_private(pacs: EmbeddedOrthanc) -> None:
    assert (pacs.workdir / "orthanc.json").stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def facade(pacs: EmbeddedOrthanc) -> Iterator[LiveServer]:
    assert pacs.credentials is not None
    user, password = pacs.credentials
    settings = {
        "dicomweb_url": pacs.dicomweb_url,
        "orthanc_url": pacs.url,
        "pacs_username": user,
        "pacs_password": password,
    }
    with serve(settings) as server:
        yield server


def test_the_facade_signs_in_for_qido_orthanc_rest_and_the_dicomweb_proxy(facade: LiveServer) -> None:
    with httpx.Client(timeout=30) as client:
        # QIDO-RS for the page, Orthanc's /tools/find for the total (FACADE_ORTHANC_URL).
        bundle = ok_json(client.get(f"{facade.base_url}/ImagingStudy", params={"patient": "ACCESS-1"}))
        assert bundle["total"] == 1
        assert bundle["entry"][0]["resource"]["id"] == STUDY_UID
        ok_json(client.get(f"{facade.base_url}/ImagingStudy/{STUDY_UID}"))
        # The DICOMweb proxy (QIDO and WADO-RS metadata) through its own client.
        root = facade.base_url.removesuffix("/fhir")
        studies = client.get(f"{root}/dicom-web/studies", params={"PatientID": "ACCESS-1"})
        assert studies.status_code == 200, studies.text
        assert len(studies.json()) == 1
        metadata = client.get(f"{root}/dicom-web/studies/{STUDY_UID}/metadata")
        assert metadata.status_code == 200, metadata.text


def test_the_endpoint_does_not_reveal_the_pacs_credentials(facade: LiveServer, pacs: EmbeddedOrthanc) -> None:
    assert pacs.credentials is not None
    with httpx.Client(timeout=30) as client:
        body = client.get(f"{facade.base_url}/Endpoint").text
    assert pacs.credentials[1] not in body


async def test_the_analyze_clients_sign_in_for_wado_and_stow(pacs: EmbeddedOrthanc) -> None:
    """$analyze's WADO-RS and STOW-RS clients (analyze/runtime.py) carry FACADE_PACS_* too."""
    (first,) = build_study(study())
    extra = StudySpec(
        patient_id="ACCESS-1",
        patient_name="Wache^Ina",
        study_uid=STUDY_UID,
        study_date="20241204",
        study_time="101500",
        series=[SeriesSpec("CT", "CORONAL", 2, n_instances=1)],
    )
    async with StowClient(pacs.dicomweb_url, auth=pacs.credentials) as stow:
        result = await stow.store(build_study(extra), study_uid=STUDY_UID)
        assert result.status == 200
    async with WadoClient(pacs.dicomweb_url, timeout=30, max_connections=1, auth=pacs.credentials) as wado:
        got = await wado.retrieve_instance(STUDY_UID, str(first.SeriesInstanceUID), str(first.SOPInstanceUID))
        assert got.SOPInstanceUID == first.SOPInstanceUID
