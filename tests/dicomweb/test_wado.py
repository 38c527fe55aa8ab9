"""WADO-RS retrieval against the real Orthanc: compressed instances come back as stored, one request
per instance, and every failure is one of our typed errors.

pydicom's compressed variants of one image share its UIDs (MR_small_RLE.dcm has the SOPInstanceUID
of MR_small.dcm), and Orthanc keeps the first file stored under a UID, so each test file is stored
under fresh UIDs derived from its name: its transfer syntax and pixel data are untouched.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fhir_facade.dicomweb.client import DicomwebError, DicomwebUnavailable
from fhir_facade.dicomweb.wado import (
    ACCEPT_DICOM_AS_STORED,
    InstanceNotFound,
    MultipartPart,
    MultipartStream,
    WadoClient,
    parse_multipart_related,
)
from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from tests.conftest import PYDICOM_TEST_FILES
from tests.dicom_factory import CORPUS_ROOT

# One file of each compressed transfer syntax family, all shipped in pydicom's wheel.
COMPRESSED = (
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG baseline (process 1)
    "JPGExtended.dcm",  # JPEG extended (process 2 and 4), 12 bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless (process 14, SV1)
)
STUDY_UID = str(generate_uid(CORPUS_ROOT, entropy_srcs=["test_wado", "study"]))
SERIES_UID = str(generate_uid(CORPUS_ROOT, entropy_srcs=["test_wado", "series"]))


def renamed(name: str, number: int) -> FileDataset:
    """The pydicom test file `name` as instance `number` of this module's study and series."""
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / name)
    sop_uid = generate_uid(CORPUS_ROOT, entropy_srcs=["test_wado", name])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY_UID, SERIES_UID, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    # Orthanc keys a series by PatientID + study + series UID: one patient keeps it one series.
    ds.PatientID, ds.PatientName = "WADO-TEST", "Test^Wado"
    ds.InstanceNumber = number
    return ds


@pytest.fixture(scope="module")
def stored(orthanc: EmbeddedOrthanc) -> dict[str, FileDataset]:
    datasets = {name: renamed(name, number) for number, name in enumerate(COMPRESSED, start=1)}
    with httpx.Client(timeout=30) as client:
        store_instances(client, orthanc.url, datasets.values())
    return datasets


@pytest.fixture
async def wado(orthanc: EmbeddedOrthanc) -> AsyncIterator[WadoClient]:
    async with WadoClient(orthanc.dicomweb_url, timeout=30, max_connections=4) as client:
        yield client


@pytest.mark.parametrize("name", COMPRESSED)
async def test_instance_comes_back_in_its_stored_transfer_syntax(
    name: str, stored: dict[str, FileDataset], wado: WadoClient
) -> None:
    original = stored[name]
    ds = await wado.retrieve_instance(STUDY_UID, SERIES_UID, original.SOPInstanceUID)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    # transfer-syntax=*: Orthanc sends the file as stored, compressed bytes and all.
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    assert ds.PixelData == original.PixelData
    assert np.array_equal(ds.pixel_array, original.pixel_array)


async def test_without_transfer_syntax_star_orthanc_transcodes(
    orthanc: EmbeddedOrthanc, stored: dict[str, FileDataset]
) -> None:
    """Why the client asks for `transfer-syntax=*`: the PS3.18 default is Explicit VR Little Endian,
    and Orthanc decompresses to give it (a 10 kB JPEG becomes a 0.5 MB file)."""
    original = stored["JPGExtended.dcm"]
    series = f"{orthanc.dicomweb_url}/studies/{STUDY_UID}/series/{SERIES_UID}"
    url = f"{series}/instances/{original.SOPInstanceUID}"
    async with httpx.AsyncClient(timeout=30) as http:
        as_stored = await http.get(url, headers={"Accept": ACCEPT_DICOM_AS_STORED})
        default = await http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    (stored_part,) = parse_multipart_related(as_stored.content, as_stored.headers["content-type"])
    (default_part,) = parse_multipart_related(default.content, default.headers["content-type"])
    transcoded = pydicom.dcmread(io.BytesIO(default_part.content))
    assert transcoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(default_part.content) > 20 * len(stored_part.content)
    # Orthanc (DCMTK) and pylibjpeg decode the same lossy JPEG with different IDCTs: off by <= 1.
    difference = transcoded.pixel_array.astype(np.int32) - original.pixel_array
    assert np.abs(difference).max() <= 1


async def test_iter_instances_yields_in_the_asked_order_one_request_each(
    stored: dict[str, FileDataset], wado: WadoClient
) -> None:
    uids = [stored[name].SOPInstanceUID for name in reversed(COMPRESSED)]
    before = wado.request_count
    seen = [ds.SOPInstanceUID async for ds in wado.iter_instances(STUDY_UID, SERIES_UID, uids)]
    assert seen == uids
    assert wado.request_count - before == len(uids)


async def test_stopping_early_fetches_no_more(stored: dict[str, FileDataset], wado: WadoClient) -> None:
    uids = [stored[name].SOPInstanceUID for name in COMPRESSED]
    before = wado.request_count
    async for ds in wado.iter_instances(STUDY_UID, SERIES_UID, uids):
        assert ds.SOPInstanceUID == uids[0]
        break
    assert wado.request_count - before == 1


async def test_unknown_instance_is_instance_not_found(
    stored: dict[str, FileDataset], wado: WadoClient
) -> None:
    with pytest.raises(InstanceNotFound, match=r"1\.2\.3\.4\.404") as raised:
        await wado.retrieve_instance(STUDY_UID, SERIES_UID, "1.2.3.4.404")
    assert not isinstance(raised.value, DicomwebUnavailable)
    with pytest.raises(InstanceNotFound):
        async for _ in wado.iter_instances("1.2.3.4", "1.2.3.5", ["1.2.3.6"]):
            pass


async def test_unreachable_pacs_is_unavailable() -> None:
    async with WadoClient(
        f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5, max_connections=1
    ) as client:
        with pytest.raises(DicomwebUnavailable, match="unreachable"):
            await client.retrieve_instance("1.2", "1.3", "1.4")


async def test_stopped_orthanc_is_unavailable(tmp_path_factory: pytest.TempPathFactory) -> None:
    orthanc = EmbeddedOrthanc(
        tmp_path_factory.mktemp("stopped"), http_port=free_port(), dicom_port=free_port()
    )
    with orthanc:
        async with WadoClient(
            orthanc.dicomweb_url, timeout=5, max_connections=1, auth=orthanc.credentials
        ) as client:
            with pytest.raises(InstanceNotFound):
                await client.retrieve_instance("1.2", "1.3", "1.4")  # it is up
            orthanc.stop()
            with pytest.raises(DicomwebUnavailable):
                await client.retrieve_instance("1.2", "1.3", "1.4")


class _FailingPacs(BaseHTTPRequestHandler):
    """Answers 503 or sends a malformed multipart body.

    A stand-in server: Orthanc cannot be made to fail with a 5xx or to break its framing on demand.
    """

    def do_GET(self) -> None:
        if self.path.endswith("/503"):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom"  # no close-delimiter
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_pacs() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingPacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


async def test_server_error_is_unavailable_and_bad_framing_is_an_error(failing_pacs: str) -> None:
    async with WadoClient(failing_pacs, timeout=5, max_connections=1) as client:
        with pytest.raises(DicomwebUnavailable, match="503"):
            await client.retrieve_instance("1.2", "1.3", "503")
        with pytest.raises(DicomwebError, match="close-delimiter") as raised:
            await client.retrieve_instance("1.2", "1.3", "1.4")
        assert not isinstance(raised.value, DicomwebUnavailable)


async def test_silent_pacs_times_out_as_unavailable() -> None:
    """A listener that accepts and never answers: a fault no real PACS produces on demand."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with WadoClient(f"http://127.0.0.1:{port}", timeout=0.5, max_connections=1) as client:
            with pytest.raises(DicomwebUnavailable, match=r"within 0\.5 s"):
                await client.retrieve_instance("1.2", "1.3", "1.4")
    finally:
        server.close()


# --- the multipart/related parser ----------------------------------------------------------------


async def test_parser_splits_a_real_series_retrieve(
    orthanc: EmbeddedOrthanc, stored: dict[str, FileDataset]
) -> None:
    """Orthanc's own framing of a multi-part answer (series-level RetrieveSeries)."""
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(
            f"{orthanc.dicomweb_url}/studies/{STUDY_UID}/series/{SERIES_UID}",
            headers={"Accept": ACCEPT_DICOM_AS_STORED},
        )
    parts = parse_multipart_related(response.content, response.headers["content-type"])
    uids = {pydicom.dcmread(io.BytesIO(part.content)).SOPInstanceUID for part in parts}
    assert uids == {ds.SOPInstanceUID for ds in stored.values()}
    assert all(part.headers["content-type"] == "application/dicom" for part in parts)


def test_parser_framing_rules() -> None:
    # Quoted boundary, a preamble, a part without headers, an epilogue (RFC 2046 5.1.1).
    body = b"preamble\r\n--a b\r\n\r\nfirst\r\n--a b\r\nX-Y: 1\r\n\r\nsecond\r\n\r\n--a b--\r\nepilogue"
    parts = parse_multipart_related(body, 'multipart/related; boundary="a b"; type="application/dicom"')
    assert [(p.headers, p.content) for p in parts] == [({}, b"first"), ({"x-y": "1"}, b"second\r\n")]


def test_parser_takes_delimiter_lookalikes_as_content() -> None:
    """ "--xyz" followed by neither CRLF, "--" nor padding is no delimiter (RFC 2046 5.1.1)."""
    content = b"\x00\r\n--xyz\x01binary"
    body = b"--xyz\r\nContent-Length: %d\r\n\r\n%s\r\n--xyz--" % (len(content), content)
    (part,) = parse_multipart_related(body, "multipart/related; boundary=xyz")
    assert part.content == content


def test_parser_refuses_a_content_length_that_disagrees_with_the_delimiter() -> None:
    """RFC 2046 5.1.1: the boundary must not occur in a part. A part whose Content-Length runs past
    a delimiter is refused, not cut by length one time and by delimiter another."""
    content = b"\x00\r\n--xyz\r\nbinary"
    body = b"--xyz\r\nContent-Length: %d\r\n\r\n%s\r\n--xyz--" % (len(content), content)
    with pytest.raises(DicomwebError, match="Content-Length"):
        parse_multipart_related(body, "multipart/related; boundary=xyz")


def test_a_matching_content_length_is_accepted() -> None:
    body = b"--xyz\r\nContent-Length: 4\r\n\r\ndata\r\n--xyz--"
    (part,) = parse_multipart_related(body, "multipart/related; boundary=xyz")
    assert (part.headers, part.content) == ({"content-length": "4"}, b"data")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_the_streaming_parser_finds_the_first_delimiter_across_chunks(chunk: int) -> None:
    """A preamble, and a body that starts with its delimiter, fed a few bytes at a time."""
    content_type = "multipart/related; boundary=xyz"
    for body in (b"pre--xy\r\n--xyz\r\n\r\none\r\n--xyz--", b"--xyz\r\n\r\none\r\n--xyz--\r\nepilogue"):
        stream = MultipartStream(content_type)
        parts = []
        for start in range(0, len(body), chunk):
            parts += stream.feed(body[start : start + chunk])
        stream.finish()
        assert parts == [MultipartPart({}, b"one")]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"--x\r\n\r\ndata\r\n--x--", "application/dicom", "expected a multipart/related"),
        (b"--x\r\n\r\ndata\r\n--x--", "multipart/related; type=application/dicom", "without a boundary"),
        (b"no delimiter here", "multipart/related; boundary=x", "no boundary delimiter"),
        (b"--x\r\nContent-Type: a\r\n", "multipart/related; boundary=x", "not terminated"),
        (b"--x\r\nbroken header\r\n\r\ndata\r\n--x--", "multipart/related; boundary=x", "malformed part"),
    ],
)
def test_parser_rejects_malformed_bodies(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(DicomwebError, match=message):
        parse_multipart_related(body, content_type)


async def test_iter_series_streams_every_instance_in_one_request(
    stored: dict[str, FileDataset], wado: WadoClient
) -> None:
    before = wado.request_count
    seen = {ds.SOPInstanceUID: ds async for ds in wado.iter_series(STUDY_UID, SERIES_UID)}
    assert wado.request_count - before == 1
    assert set(seen) == {ds.SOPInstanceUID for ds in stored.values()}
    for original in stored.values():
        assert seen[original.SOPInstanceUID].PixelData == original.PixelData


async def test_iter_series_of_an_unknown_series_is_not_found(wado: WadoClient) -> None:
    with pytest.raises(InstanceNotFound):
        async for _ in wado.iter_series("1.2.3.4", "1.2.3.5"):
            pass


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_the_streaming_parser_agrees_with_the_whole_body_parser(
    orthanc: EmbeddedOrthanc, stored: dict[str, FileDataset], chunk: int
) -> None:
    """A real Orthanc series answer, fed in chunks of every size (a delimiter split across
    chunks included), gives the same parts as parsing the whole body."""
    url = f"{orthanc.dicomweb_url}/studies/{STUDY_UID}/series/{SERIES_UID}"
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(url, headers={"Accept": ACCEPT_DICOM_AS_STORED})
    content_type = response.headers["content-type"]
    expected = parse_multipart_related(response.content, content_type)
    stream = MultipartStream(content_type)
    parts = []
    body = response.content
    for start in range(0, len(body), chunk):
        parts += stream.feed(body[start : start + chunk])
    assert stream.done
    assert parts == expected and len(parts) == len(stored)
