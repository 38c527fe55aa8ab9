"""A pooled connection the PACS closed just as it was reused: an idempotent QIDO is sent again on a
new connection, a STOW is not (fhir_facade/dicomweb/pooled_client.py).

The fault is caused for real: a loopback HTTP server that drops its first connection after reading
the request, without answering (what a keep-alive connection closed by Orthanc looks like to the
client), and answers normally on the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fhir_facade.dicomweb import DicomwebClient
from fhir_facade.dicomweb.errors import DicomwebUnavailable
from fhir_facade.dicomweb.stow import StowClient


class DroppingServer:
    """Drops the first `drops` connections after reading a request head; answers the others."""

    def __init__(self, drops: int = 1) -> None:
        self.drops = drops
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if self.connections <= self.drops:
            writer.close()  # no status line: the client sees RemoteProtocolError
            return
        body = b"[]"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> DroppingServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def dropping() -> AsyncIterator[DroppingServer]:
    async with DroppingServer() as server:
        yield server


async def test_a_qido_on_a_dropped_connection_is_sent_once_more(dropping: DroppingServer) -> None:
    async with DicomwebClient(f"http://127.0.0.1:{dropping.port}", timeout=5, max_connections=2) as qido:
        assert await qido.search_studies({"PatientID": "P-1"}) == []
    assert dropping.connections == 2


async def test_a_qido_dropped_twice_is_unavailable() -> None:
    async with (
        DroppingServer(drops=2) as server,
        DicomwebClient(f"http://127.0.0.1:{server.port}", timeout=5, max_connections=2) as qido,
    ):
        with pytest.raises(DicomwebUnavailable, match="unreachable: RemoteProtocolError"):
            await qido.search_studies({})
    assert server.connections == 2


async def test_a_stow_on_a_dropped_connection_is_not_repeated(dropping: DroppingServer) -> None:
    async with StowClient(f"http://127.0.0.1:{dropping.port}", timeout=5) as stow:
        with pytest.raises(DicomwebUnavailable):
            await stow.store([sr_like_dataset()])
    assert dropping.connections == 1


def sr_like_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    return ds
