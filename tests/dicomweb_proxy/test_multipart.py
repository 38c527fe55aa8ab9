"""The STOW-RS body reader and writer on their own (no I/O): the same parts however the body is cut
into chunks, a preamble told apart byte by byte, and a re-encoded body that splits back into the
very same contents."""

from __future__ import annotations

import asyncio

import pytest

from fhir_facade.dicomweb.wado import parse_multipart_related
from fhir_facade.dicomweb_proxy.multipart import CanonicalBody, StowReader, parse_stow_content_type
from fhir_facade.fhir.errors import FhirError

CONTENTS = [b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4, b"\r\n--BN\r\n--BNDX\r\n" * 3 + b"end"]


def _body(contents: list[bytes], boundary: bytes = b"BND") -> bytes:
    parts = [
        b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + c + b"\r\n" for c in contents
    ]
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


def _read(body: bytes, chunk: int) -> StowReader:
    reader = StowReader(b"BND")
    for start in range(0, len(body), chunk):
        reader.feed(body[start : start + chunk])
    reader.finish()
    return reader


def _contents(reader: StowReader) -> list[bytes]:
    out = []
    for part in reader.parts:
        with reader.open_part(part) as content:
            out.append(content.read())
    return out


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_same_parts_whatever_the_chunks(chunk: int) -> None:
    """A delimiter, the preamble check and the own-boundary scan may all straddle two chunks."""
    reader = _read(b"\r\n" + _body(CONTENTS), chunk)
    try:
        assert _contents(reader) == CONTENTS
    finally:
        reader.close()


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
@pytest.mark.parametrize("start", [b"X--BND\r\n", b"\r\n\r\n--BND\r\n", b" --BND\r\n", b"--BNX\r\n"])
def test_anything_but_one_crlf_before_the_first_delimiter_is_refused(start: bytes, chunk: int) -> None:
    body = start + _body(CONTENTS)[len(b"--BND\r\n") :]
    with pytest.raises(FhirError) as refused:
        _read(body, chunk)
    assert refused.value.status == 400


def test_the_reencoded_body_splits_back_into_the_same_parts() -> None:
    reader = _read(_body(CONTENTS), 1 << 20)
    try:
        body = CanonicalBody(reader)

        async def collect() -> bytes:
            return b"".join([chunk async for chunk in body.chunks()])

        encoded = asyncio.run(collect())
        assert len(encoded) == body.length
        assert reader.boundary.decode() not in _body(CONTENTS).decode("latin-1")
        assert parse_stow_content_type(body.content_type) == reader.boundary
        assert [p.content for p in parse_multipart_related(encoded, body.content_type)] == CONTENTS
        assert [p.headers for p in parse_multipart_related(encoded, body.content_type)] == [
            {"content-type": "application/dicom"}
        ] * 2
    finally:
        reader.close()


def test_a_part_holding_the_proxys_own_boundary_is_refused() -> None:
    reader = StowReader(b"BND")
    body = _body([b"x" * 10 + b"--" + reader.boundary + b"y"])
    with pytest.raises(FhirError) as refused:
        for start in range(0, len(body), 5):
            reader.feed(body[start : start + 5])
    assert refused.value.status == 400
    reader.close()
