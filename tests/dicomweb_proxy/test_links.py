"""Links in DICOMweb answers name the proxy (ADR 0016), and `includefield` lists reach Orthanc as one
attribute per `includefield`: the pure rewriting first, then against the real Orthanc behind the
bare proxy (the facade with real tokens: tests/auth/test_client_links.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import httpx
import pytest

from fhir_facade.dicomweb_proxy.include_fields import split_include_fields
from fhir_facade.dicomweb_proxy.links import LinkRewriter
from tests.dicom_factory import CORPUS, series_instance_uid
from tests.dicomweb_proxy.conftest import caller, new_study, stow_body

PACS = "http://127.0.0.1:8042/dicom-web"
PROXY = "https://facade.example.org/dicom-web"
MUELLER_MR = CORPUS["mueller_mr_brain"].study_uid
MUELLER_SERIES = series_instance_uid(MUELLER_MR, 1)
P1001 = caller("patient/ImagingStudy.rs", "P-1001")
DICOM_JSON = {"Accept": "application/dicom+json"}
DICOM_XML = {"Accept": 'multipart/related; type="application/dicom+xml"'}
# What OHIF 3 sends for its study list: one includefield holding a percent-encoded comma list.
OHIF_STUDY_QUERY = "limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060"


def _metadata_like(n: int) -> bytes:
    items = [
        b'{"00081190":{"vr":"UR","Value":["http://127.0.0.1:8042/dicom-web/studies/1.%d"]},' % i
        + b'"7FE00010":{"vr":"OW","BulkDataURI":"HTTPS://pacs.internal:8443/dicom-web/studies/1.%d/bulk"},'
        % i
        + b'"00081030":{"vr":"LO","Value":["see http://127.0.0.1:8042/dicom-web/studies/1.%d"]},' % i
        + b'"0040E010":{"vr":"UR","Value":["http://elsewhere.example/wado/studies/1.%d"]}}' % i
        for i in range(n)
    ]
    return b"[" + b",".join(items) + b"]"


def test_every_pacs_link_names_the_proxy_whatever_host_the_pacs_wrote() -> None:
    links = LinkRewriter(PACS, PROXY)
    out = links.rewrite(_metadata_like(2))
    assert out.count(f'"{PROXY}/studies/1.0'.encode()) == 2  # RetrieveURL and BulkDataURI
    assert b"pacs.internal" not in out and b'"http://127.0.0.1:8042' not in out
    # Free text mentioning a URL and links outside the PACS's DICOMweb root stay as they are.
    assert b'"see http://127.0.0.1:8042/dicom-web/studies/1.0"' in out
    assert b'"http://elsewhere.example/wado/studies/1.0"' in out


def test_xml_attributes_and_element_text_are_rewritten() -> None:
    xml = (
        b'<BulkData URI="http://127.0.0.1:8042/dicom-web/studies/1/series/2/instances/3/bulk/7fe00010" />'
        b'<Value number="1">http://pacs:80/dicom-web/studies/1</Value>'
    )
    out = LinkRewriter(PACS, PROXY).rewrite(xml)
    assert (
        out
        == (
            f'<BulkData URI="{PROXY}/studies/1/series/2/instances/3/bulk/7fe00010" />'
            f'<Value number="1">{PROXY}/studies/1</Value>'
        ).encode()
    )


def test_a_stream_is_rewritten_as_the_whole_body_however_it_is_cut() -> None:
    links = LinkRewriter(PACS, PROXY)
    body = _metadata_like(200)
    expected = links.rewrite(body)
    chance = random.Random(16)

    async def joined(parts: list[bytes]) -> bytes:
        async def chunks() -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        return b"".join([piece async for piece in links.stream(chunks())])

    for _ in range(50):
        cuts = sorted(chance.sample(range(1, len(body)), chance.randint(1, 300)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert asyncio.run(joined(parts)) == expected
    one_byte_at_a_time = [bytes([b]) for b in body[:3000]]
    assert asyncio.run(joined(one_byte_at_a_time)) == links.rewrite(body[:3000])


def test_location_headers_are_rewritten() -> None:
    links = LinkRewriter(PACS, PROXY)
    assert links.rewrite_url(f"{PACS}/studies/1.2") == f"{PROXY}/studies/1.2"
    assert (
        links.rewrite_url("http://127.0.0.1:8042/app/explorer.html")
        == "http://127.0.0.1:8042/app/explorer.html"
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("includefield=00081030%2C00080060", "includefield=00081030&includefield=00080060"),
        ("includefield=00081030%2c00080060", "includefield=00081030&includefield=00080060"),
        ("includefield=StudyDescription,00080060,", "includefield=StudyDescription&includefield=00080060"),
        (
            "PatientName=M%C3%BC*&includefield=a%2Cb&limit=3",
            "PatientName=M%C3%BC*&includefield=a&includefield=b&limit=3",
        ),
        ("PatientID=P-1001%2CJP-0042&includefield=all", "PatientID=P-1001%2CJP-0042&includefield=all"),
        ("includefield=", "includefield="),
        ("", ""),
    ],
)
def test_include_field_lists_are_split_and_nothing_else_is_touched(query: str, expected: str) -> None:
    assert split_include_fields(query) == expected


def test_ohif_study_list_query_gets_descriptions(proxy: httpx.Client, direct: httpx.Client) -> None:
    """OHIF's study list through the proxy shows each study's description and modalities."""
    described = {spec.study_uid: spec.description for spec in CORPUS.values() if spec.description}
    # Orthanc itself ignores the encoded list: the test is not vacuous.
    assert all("00081030" not in ds for ds in direct.get(f"studies?{OHIF_STUDY_QUERY}").json())
    for headers in ({}, P1001):
        studies = proxy.get(f"/studies?{OHIF_STUDY_QUERY}", headers={**DICOM_JSON, **headers}).json()
        found = {ds["0020000D"]["Value"][0]: ds for ds in studies}
        assert set(described) & set(found), "the corpus studies are listed"
        for uid in set(described) & set(found):
            assert found[uid]["00081030"]["Value"] == [described[uid]]
            assert found[uid]["00080061"]["Value"]  # ModalitiesInStudy
            assert found[uid]["00080060"]["Value"]  # Modality, asked for as OHIF does


def test_xml_metadata_names_the_proxy(proxy: httpx.Client, direct: httpx.Client) -> None:
    path = f"/studies/{MUELLER_MR}/series/{MUELLER_SERIES}/metadata"
    theirs = direct.get(path.lstrip("/"), headers=DICOM_XML)
    assert str(direct.base_url).rstrip("/") in theirs.text  # Orthanc names itself
    for headers in ({}, P1001):
        ours = proxy.get(path, headers={**DICOM_XML, **headers})
        assert ours.status_code == 200
        assert ours.headers["content-type"].startswith('multipart/related; type="application/dicom+xml"')
        assert str(direct.base_url).rstrip("/") not in ours.text
        assert f'URI="{str(proxy.base_url).rstrip("/")}/studies/{MUELLER_MR}/series/' in ours.text


def test_stow_answer_names_the_proxy(scratch_proxy: httpx.Client, scratch_direct: httpx.Client) -> None:
    body, content_type = stow_body(new_study("PROXY-LINKS"))
    stored = scratch_proxy.post(
        "/studies", content=body, headers={**DICOM_JSON, "Content-Type": content_type}
    )
    assert stored.status_code == 200, stored.text
    retrieve = [stored.json()["00081190"]["Value"][0]] + [
        item["00081190"]["Value"][0] for item in stored.json()["00081199"]["Value"]
    ]
    assert len(retrieve) == 3
    for url in retrieve:
        assert url.startswith(f"{str(scratch_proxy.base_url).rstrip('/')}/studies/")
        assert scratch_proxy.get(url).status_code == 200  # a study and its instances, as DICOM
    assert str(scratch_direct.base_url).rstrip("/") not in stored.text
