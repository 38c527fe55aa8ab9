"""Every link the facade hands a client goes through the facade's own DICOMweb proxy and works with the
client's own credentials (ADR 0016): Endpoint.address, RetrieveURL and BulkDataURI in QIDO and WADO
answers, and the AI report's presentedForm.url, with FACADE_AUTH=none and with SMART tokens.

The PACS of the last module fixture writes links with a host name of its own (Orthanc's DicomWeb
"Host"/"Ssl" settings) and wants the facade's credentials: a client following one of its links
would reach nothing, or go around the token check."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fhir_facade.dicomweb.wado import parse_multipart_related
from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import CORPUS, demo_brain_study

MUELLER_MR = CORPUS["mueller_mr_brain"].study_uid  # P-1001
DICOM_JSON = {"Accept": "application/dicom+json"}
AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
PACS_HOST = "pacs.internal.example:8443"
STUDY_UID = "1.2.826.0.1.3680043.8.498.727.9601"
PATIENT = "LINKS-1"
ANALYZE = "launch/patient patient/ImagingStudy.rs patient/DiagnosticReport.cr"


def links_in(value: Any) -> list[str]:
    """Every URL-valued element of DICOM JSON (PS3.18 F.2): UR values and BulkDataURIs, nested too."""
    found: list[str] = []
    if isinstance(value, list):
        for item in value:
            found += links_in(item)
    elif isinstance(value, dict):
        if isinstance(value.get("BulkDataURI"), str):
            found.append(value["BulkDataURI"])
        if value.get("vr") == "UR":
            found += [v for v in value.get("Value", []) if isinstance(v, str)]
        for item in value.values():
            if isinstance(item, dict | list):
                found += links_in(item)
    return found


@dataclass
class Caller:
    """A client of one facade: its DICOMweb proxy root and the credentials it sends."""

    server: LiveServer
    headers: dict[str, str]

    @property
    def proxy(self) -> str:
        return self.server.base_url.removesuffix("/fhir") + "/dicom-web"

    def get(self, url: str, **headers: str) -> httpx.Response:
        return httpx.get(url, headers={**self.headers, **headers}, timeout=60)


@pytest.fixture(params=["auth-none", "user-token", "patient-token"])
def caller(request: pytest.FixtureRequest) -> Caller:
    """The same client three ways: FACADE_AUTH=none, a user/ token, a patient/ token (confined)."""
    if request.param == "auth-none":
        return Caller(request.getfixturevalue("facade"), {})
    issuer: TestIssuer = request.getfixturevalue("issuer")
    secured: LiveServer = request.getfixturevalue("secured")
    if request.param == "user-token":
        return Caller(secured, issuer.headers("user/ImagingStudy.rs user/Endpoint.rs"))
    scope = "launch/patient patient/ImagingStudy.rs patient/Endpoint.rs"
    return Caller(secured, issuer.headers(scope, patient="P-1001"))


def test_endpoint_address_is_the_proxy_and_answers_the_caller(
    caller: Caller, loaded_orthanc: EmbeddedOrthanc
) -> None:
    endpoint = ok_json(caller.get(f"{caller.server.base_url}/Endpoint/dicom-qido-rs"))
    assert endpoint["address"] == caller.proxy
    assert loaded_orthanc.url not in str(endpoint)
    assert caller.get(f"{endpoint['address']}/studies", **DICOM_JSON).status_code == 200


def test_qido_links_name_the_proxy_and_work_with_the_same_credentials(
    caller: Caller, loaded_orthanc: EmbeddedOrthanc
) -> None:
    for query in (
        "studies?includefield=00081190",
        f"studies/{MUELLER_MR}/series?includefield=00081190",
        f"instances?StudyInstanceUID={MUELLER_MR}&includefield=00081190",
    ):
        response = caller.get(f"{caller.proxy}/{query}", **DICOM_JSON)
        assert response.status_code == 200, response.text
        links = links_in(response.json())
        assert links, query
        assert all(link.startswith(f"{caller.proxy}/studies/") for link in links), links
        assert loaded_orthanc.url not in response.text
    series_link = links_in(caller.get(f"{caller.proxy}/studies/{MUELLER_MR}/series", **DICOM_JSON).json())[0]
    followed = caller.get(f"{series_link}/metadata", **DICOM_JSON)
    assert followed.status_code == 200 and followed.json()


def test_metadata_bulk_data_links_name_the_proxy_and_work(
    caller: Caller, loaded_orthanc: EmbeddedOrthanc
) -> None:
    response = caller.get(f"{caller.proxy}/studies/{MUELLER_MR}/metadata", **DICOM_JSON)
    assert response.status_code == 200, response.text
    links = links_in(response.json())
    assert len(links) == len(response.json()) == 7  # the pixel data of each instance
    assert all(link.startswith(f"{caller.proxy}/studies/{MUELLER_MR}/series/") for link in links)
    assert loaded_orthanc.url not in response.text
    bulk = caller.get(links[0], Accept='multipart/related; type="application/octet-stream"')
    assert bulk.status_code == 200
    assert parse_multipart_related(bulk.content, bulk.headers["content-type"])[0].content


def test_proxy_links_need_the_token_where_auth_is_on(secured: LiveServer, issuer: TestIssuer) -> None:
    proxy = secured.base_url.removesuffix("/fhir") + "/dicom-web"
    token = issuer.headers("user/ImagingStudy.rs")
    link = links_in(
        httpx.get(f"{proxy}/studies/{MUELLER_MR}/series", headers={**DICOM_JSON, **token}).json()
    )[0]
    outcome(httpx.get(f"{link}/metadata", headers=DICOM_JSON), 401, "login")


@pytest.fixture(scope="module")
def own_host_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    """An Orthanc that wants the facade's credentials and writes its links as https://PACS_HOST."""
    pacs = EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-links"), http_port=free_port(), dicom_port=free_port()
    )
    pacs.extra_config = {"DicomWeb": {**pacs.config()["DicomWeb"], "Host": PACS_HOST, "Ssl": True}}
    with pacs:
        with pacs.client(timeout=60) as http:
            store_instances(http, pacs.url, demo_brain_study(STUDY_UID, PATIENT, 4))
        yield pacs


@pytest.fixture(scope="module")
def analyzing(own_host_pacs: EmbeddedOrthanc) -> Iterator[tuple[LiveServer, TestIssuer]]:
    """A SMART facade before that PACS, writing each $analyze result there as a DICOM SR."""
    assert own_host_pacs.credentials is not None
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    username, password = own_host_pacs.credentials
    settings = {
        **issuer.facade_settings,
        "dicomweb_url": own_host_pacs.dicomweb_url,
        "pacs_username": username,
        "pacs_password": password,
        "analyze_enabled": True,
        "analyze_worklist": False,
        "analyze_write_sr": True,
    }
    with serve(settings, port=port) as server:
        yield server, issuer
    issuer.close()


def test_links_of_a_pacs_with_a_host_of_its_own_name_the_proxy(
    own_host_pacs: EmbeddedOrthanc, analyzing: tuple[LiveServer, TestIssuer]
) -> None:
    server, issuer = analyzing
    with own_host_pacs.client() as direct:  # what Orthanc writes: not the address the facade uses
        written = links_in(direct.get(f"{own_host_pacs.dicomweb_url}/studies/{STUDY_UID}/series").json())
    assert written and all(link.startswith(f"https://{PACS_HOST}/dicom-web/studies/") for link in written)
    client = Caller(server, issuer.headers("launch/patient patient/ImagingStudy.rs", patient=PATIENT))
    for path in (f"studies/{STUDY_UID}/series", f"studies/{STUDY_UID}/metadata"):
        response = client.get(f"{client.proxy}/{path}", **DICOM_JSON)
        assert response.status_code == 200, response.text
        links = links_in(response.json())
        assert links and all(link.startswith(f"{client.proxy}/studies/{STUDY_UID}/") for link in links)
        assert PACS_HOST not in response.text and own_host_pacs.url not in response.text


def test_report_links_its_sr_through_the_proxy(
    own_host_pacs: EmbeddedOrthanc, analyzing: tuple[LiveServer, TestIssuer]
) -> None:
    """$analyze with the SR written: presentedForm.url downloads the SR with the caller's token."""
    server, issuer = analyzing
    client = Caller(server, issuer.headers(ANALYZE, patient=PATIENT))
    report = ok_json(
        httpx.post(
            f"{server.base_url}/ImagingStudy/{STUDY_UID}/$analyze", headers=client.headers, timeout=300
        )
    )
    (form,) = report["presentedForm"]
    assert form["url"].startswith(f"{client.proxy}/studies/{STUDY_UID}/series/")
    assert own_host_pacs.url not in str(report) and PACS_HOST not in str(report)
    sop_uid = report["identifier"][0]["value"].removeprefix("urn:oid:")
    assert form["url"].endswith(f"/instances/{sop_uid}")
    downloaded = client.get(form["url"], **AS_STORED)
    assert downloaded.status_code == 200, downloaded.text
    (part,) = parse_multipart_related(downloaded.content, downloaded.headers["content-type"])
    assert part.content[128:132] == b"DICM" and sop_uid.encode() in part.content
    outcome(httpx.get(form["url"], headers=AS_STORED, timeout=60), 401, "login")
