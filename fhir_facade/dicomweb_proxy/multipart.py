"""STOW-RS request bodies read strictly and written anew (RFC 2046 5.1.1, RFC 2387, PS3.18 8.6.1.1).

The proxy never forwards a client's multipart bytes: two parsers seldom agree on every odd framing
(a "preamble" before a delimiter without CRLF, LF-only delimiters, a Content-Length that spans a
delimiter, two boundary parameters), and any disagreement lets a part through that the proxy did
not check. So the body is split once, here, by python-multipart's streaming parser (the one
Starlette uses for forms; its delimiter is CRLF "--" boundary as RFC 2046 requires, and its part
header grammar is strict), and what goes to the PACS is a new multipart/related body of exactly
the parts that were read, under a boundary of our own. What the PACS receives is what was checked.

What is refused rather than guessed at (400 `invalid`, or 415 `not-supported` for a media type):

- a Content-Type that is not `multipart/related`, whose parameters do not parse (RFC 2045 5.1), or
  that names a parameter twice or one other than `boundary` and `type`; a `type` other than
  `application/dicom` (the metadata + bulkdata form of STOW-RS is not supported);
- anything before the first delimiter but one CRLF (RFC 2046 says the preamble "should be left
  blank"; a non-blank one is how the parsers above were told apart), a missing close-delimiter,
  a body without parts;
- a part without exactly one `Content-Type: application/dicom` (a nested multipart included), with
  a repeated header, a Content-Transfer-Encoding other than binary, or a Content-Length that is not
  its length.

The epilogue (after the close-delimiter) is ignored as RFC 2046 says, and never sent on.

Memory: part contents go to one `SpooledTemporaryFile` that stays in memory up to
`SPOOL_IN_MEMORY_BYTES` and moves to a temporary file beyond; the caller bounds the body's size.
"""

from __future__ import annotations

import io
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from fhir_facade.fhir.errors import bad_request, unsupported_media_type

__all__ = [
    "DICOM_MEDIA_TYPE",
    "SPOOL_IN_MEMORY_BYTES",
    "CanonicalBody",
    "StowPart",
    "StowReader",
    "parse_stow_content_type",
]

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_RELATED = "multipart/related"

#: Part contents held in memory before the spool moves to a temporary file.
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024

_CHUNK = 64 * 1024

# RFC 2045 5.1 / RFC 7230 3.2.6: token and quoted-string.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN}/{_TOKEN})\s*")
_PARAMETER = re.compile(rf";\s*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})\s*")
# RFC 2046 5.1.1: 1 to 70 bchars, not ending with a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PART_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


@dataclass(frozen=True)
class _MediaType:
    media_type: str
    params: dict[str, str]


def _parse_media_type(value: str, what: str) -> _MediaType:
    """A Content-Type value per RFC 2045 5.1, refusing a repeated or unparsable parameter."""
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise bad_request(f"{what} {value!r} is not a media type")
    params: dict[str, str] = {}
    position = match.end()
    while position < len(value):
        param = _PARAMETER.match(value, position)
        if param is None:
            raise bad_request(f"{what} {value!r} has a malformed parameter at offset {position}")
        name, raw = param.group(1).lower(), param.group(2)
        if name in params:
            raise bad_request(f"{what} {value!r} names the parameter {name!r} twice")
        params[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        position = param.end()
    return _MediaType(match.group(1).lower(), params)


def parse_stow_content_type(content_type: str) -> bytes:
    """The boundary of a STOW-RS request's Content-Type (PS3.18 8.6.1.1: multipart/related with
    `type="application/dicom"`), or the 400/415 refusal that says what is wrong with it."""
    parsed = _parse_media_type(content_type, "Content-Type")
    if parsed.media_type != MULTIPART_RELATED:
        raise unsupported_media_type(f"STOW-RS needs a multipart/related body, got {content_type!r}")
    unknown = sorted(set(parsed.params) - {"boundary", "type"})
    if unknown:
        raise bad_request(f"Content-Type parameter(s) {', '.join(unknown)} are not supported in STOW-RS")
    part_type = parsed.params.get("type")
    if part_type is not None and part_type.lower() != DICOM_MEDIA_TYPE:
        raise unsupported_media_type(
            f"Content-Type type={part_type!r}: this STOW-RS takes {DICOM_MEDIA_TYPE} parts only"
        )
    boundary = parsed.params.get("boundary")
    if boundary is None:
        raise bad_request("The multipart/related Content-Type has no boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise bad_request(f"The boundary {boundary!r} is not an RFC 2046 boundary")
    return boundary.encode("ascii")


@dataclass
class StowPart:
    """One part as read: its number (from 1) and where its content lies in the spool."""

    number: int
    offset: int
    size: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class _PartFile(io.RawIOBase):
    """A read-only, seekable window on one part's content in the spool (for pydicom)."""

    def __init__(self, spool: IO[bytes], part: StowPart) -> None:
        super().__init__()
        self._spool, self._start, self._size, self._position = spool, part.offset, part.size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        self._spool.seek(self._start + self._position)
        data = self._spool.read(wanted)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class StowReader:
    """Feeds a STOW-RS body chunk by chunk to python-multipart and keeps the parts it finds.

    `feed` each chunk, then `finish`; the parts are then in `parts` and their contents in the spool
    (`open_part`). `close` releases the spool. A refusal is raised as a FhirError (400) as soon as
    the framing or a part header is wrong.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        # Ours, for the body sent on: random, so no client can put it into a part on purpose, and
        # every part is still checked not to hold it (RFC 2046 5.1.1).
        self.boundary = secrets.token_hex(24).encode("ascii")
        self._marker = b"--" + self.boundary
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115
        self.parts: list[StowPart] = []
        self._start = b""
        self._started = False
        self._ended = False
        self._tail = b""
        self._name = b""
        self._value = b""
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        if not self._started:
            # python-multipart skips whatever lies between leading line breaks and the first "-";
            # we accept one CRLF before the first delimiter and nothing else.
            self._start += chunk
            openings = (self._delimiter, b"\r\n" + self._delimiter)
            if not any(self._start.startswith(opening) for opening in openings):
                if any(opening.startswith(self._start) for opening in openings):
                    return  # not enough bytes yet to tell
                raise bad_request(
                    "The multipart body must begin with its boundary delimiter: a preamble is not accepted"
                )
            self._started, chunk, self._start = True, self._start, b""
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise bad_request(f"Malformed multipart/related body: {exc}") from exc

    def finish(self) -> list[StowPart]:
        """The parts, once the whole body has been fed; refuses a body cut short or without parts."""
        if not self._started:
            raise bad_request("The multipart body must begin with its boundary delimiter")
        if not self._ended:
            raise bad_request("The multipart/related body ends without its close-delimiter")
        if not self.parts:
            raise bad_request("The STOW-RS body holds no instances")
        return self.parts

    def open_part(self, part: StowPart) -> BinaryIO:
        """A seekable reader of one part's content."""
        # Not an io.BufferedReader: pydicom takes one for a file on disk and keeps its name.
        return cast(BinaryIO, _PartFile(self.spool, part))

    def close(self) -> None:
        self.spool.close()

    # python-multipart callbacks ------------------------------------------------------------------

    def _part_begin(self) -> None:
        self.parts.append(StowPart(len(self.parts) + 1, self.spool.tell()))
        self._tail = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        part = self.parts[-1]
        name = self._name.decode("ascii").lower()  # python-multipart lets tokens through only
        value = self._value.decode("latin-1").strip(" \t")
        self._name = self._value = b""
        if not _PART_HEADER_VALUE.fullmatch(value):
            raise bad_request(f"Part {part.number}: header {name} holds control characters")
        if name in part.headers:
            raise bad_request(f"Part {part.number}: header {name} appears twice")
        part.headers[name] = value

    def _headers_finished(self) -> None:
        part = self.parts[-1]
        content_type = part.headers.get("content-type")
        if content_type is None:
            raise bad_request(f"Part {part.number} has no Content-Type; STOW-RS parts are {DICOM_MEDIA_TYPE}")
        parsed = _parse_media_type(content_type, f"Part {part.number} Content-Type")
        if parsed.media_type != DICOM_MEDIA_TYPE:
            raise unsupported_media_type(
                f"Part {part.number} is {parsed.media_type!r}; "
                f"this STOW-RS takes {DICOM_MEDIA_TYPE} parts only"
            )
        if set(parsed.params) - {"transfer-syntax"}:
            raise bad_request(f"Part {part.number} Content-Type {content_type!r} has unsupported parameters")
        encoding = part.headers.get("content-transfer-encoding", "binary").lower()
        if encoding != "binary":
            raise bad_request(f"Part {part.number} Content-Transfer-Encoding {encoding!r} is not binary")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        window = self._tail + chunk
        if self._marker in window:
            # A 192-bit random value chosen after the client sent its headers: not guessable.
            raise bad_request("A part holds the proxy's own boundary; please retry")
        self._tail = window[-(len(self._marker) - 1) :]
        self.spool.write(chunk)
        self.parts[-1].size += len(chunk)

    def _part_end(self) -> None:
        part = self.parts[-1]
        declared = part.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) != part.size):
            raise bad_request(
                f"Part {part.number} declares Content-Length {declared} but holds {part.size} bytes"
            )

    def _end(self) -> None:
        self._ended = True


@dataclass(frozen=True)
class CanonicalBody:
    """The checked parts as a new multipart/related body (RFC 2387) under the reader's boundary,
    each with only `Content-Type: application/dicom`: what the PACS receives."""

    reader: StowReader

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={self.reader.boundary.decode()}'

    def _part_head(self, index: int) -> bytes:
        # RFC 2046 5.1.1: the CRLF before a delimiter belongs to the delimiter, not to the part.
        lead = b"" if index == 0 else b"\r\n"
        return b"%s--%s\r\nContent-Type: %s\r\n\r\n" % (lead, self.reader.boundary, DICOM_MEDIA_TYPE.encode())

    def _close(self) -> bytes:
        return b"\r\n--" + self.reader.boundary + b"--\r\n"

    @property
    def length(self) -> int:
        parts = self.reader.parts
        return sum(len(self._part_head(i)) + p.size for i, p in enumerate(parts)) + len(self._close())

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, read from the spool one chunk at a time."""
        for index, part in enumerate(self.reader.parts):
            yield self._part_head(index)
            with self.reader.open_part(part) as content:
                while chunk := content.read(_CHUNK):
                    yield chunk
        yield self._close()
