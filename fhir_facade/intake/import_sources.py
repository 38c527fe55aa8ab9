"""An import's upload, entry by entry (never the whole body in memory).

Three bodies are taken (ADR 0038): `application/dicom` (one Part 10 file), `multipart/related;
type="application/dicom"` (the STOW-RS body, split by the proxy's strict reader, ADR 0014) and
`application/zip` (folders nested at any depth, a DICOMDIR, files of any other kind). The body is
written to a temporary file in chunks as it arrives (zipfile needs a seekable file, and a zip's
directory is at its end). `upload_entries` then names the entries in order, each with a `load`
that reads it: a member up to `IN_MEMORY_BYTES` into memory (decompressed, its CRC checked, hashed),
a larger one into its own file. Loads of different entries may run in parallel threads: zipfile
reads members of one archive concurrently (a shared file under a lock), and zlib, the CRC and
sha256 release the GIL. What is not an instance is reported, not refused: a DICOMDIR (the media's
index, PS3.10 8.6), a directory entry, a file that is not DICOM Part 10.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fhir_facade.dicomweb_proxy.multipart import StowReader, parse_stow_content_type
from fhir_facade.fhir.errors import bad_request, unsupported_media_type
from fhir_facade.intake.validation import DICM_OFFSET

__all__ = [
    "IMPORT_MEDIA_TYPES",
    "IN_MEMORY_BYTES",
    "Entry",
    "Member",
    "body_kind",
    "spool_body",
    "upload_entries",
]

IMPORT_MEDIA_TYPES = ("application/dicom", "multipart/related", "application/zip")
#: Entries up to this size are held in memory between reading and storing (a bounded number of
#: them at a time, run_import); larger ones (big multi-frame objects) are copied to their own file.
IN_MEMORY_BYTES = 8 * 1024 * 1024
_CHUNK = 256 * 1024


@dataclass
class Member:
    """One entry of the upload: a candidate instance (its bytes in `data`, or a file at `path`), or
    something `skipped` (and why)."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    sha256: str = ""
    size: int = 0
    skipped: str | None = None

    @property
    def readable(self) -> bool:
        return self.skipped is None and (self.data is not None or self.path is not None)

    def content(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def release(self) -> None:
        """Forget the bytes (and the file) once the entry is stored or refused: memory stays bounded."""
        self.data = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Entry:
    """An entry of the upload, named in order; `load()` reads it (in any thread)."""

    name: str
    load: Callable[[], Member]


def body_kind(content_type: str) -> str:
    """Which of the three bodies this is (415 for any other media type)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in ("application/zip", "application/x-zip-compressed"):
        return "zip"
    if media_type in IMPORT_MEDIA_TYPES:
        return media_type.split("/")[0] if media_type == "multipart/related" else "dicom"
    raise unsupported_media_type(
        f'$import takes application/dicom, multipart/related; type="application/dicom" or '
        f"application/zip, not {media_type or 'a body without Content-Type'}"
    )


async def spool_body(chunks: AsyncIterator[bytes], content_type: str, workdir: Path) -> tuple[str, Path]:
    """Write the body under `workdir` as it arrives: (kind, path). A multipart body is split while
    it streams (its parts spool to disk beyond 8 MiB) and its parts written as `parts/N`."""
    kind = body_kind(content_type)
    if kind == "multipart":
        boundary = parse_stow_content_type(content_type)
        reader = StowReader(boundary)
        try:
            async for chunk in chunks:
                reader.feed(chunk)
            parts = reader.finish()
            folder = workdir / "parts"
            folder.mkdir()
            for index, part in enumerate(parts):
                with reader.open_part(part) as source, open(folder / f"{index:06d}", "wb") as target:
                    shutil.copyfileobj(source, target, _CHUNK)
        finally:
            reader.close()
        return kind, folder
    path = workdir / "body"
    size = 0
    with open(path, "wb") as target:
        async for chunk in chunks:
            target.write(chunk)
            size += len(chunk)
    if size == 0:
        raise bad_request("The body of $import is empty")
    return kind, path


def _hashed(source: IO[bytes], target: Path) -> tuple[str, int, bool]:
    """Copy `source` to `target`: (sha256, size, whether it has the Part 10 "DICM" prefix)."""
    digest = hashlib.sha256()
    size = 0
    head = b""
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            if len(head) < DICM_OFFSET + 4:
                head += chunk[: DICM_OFFSET + 4]
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, _part10(head)


def _part10(head: bytes) -> bool:
    return head[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def _file_member(name: str, path: Path) -> Member:
    """A file already on disk (the body, a multipart part): in memory if small, hashed either way."""
    size = path.stat().st_size
    if size <= IN_MEMORY_BYTES:
        data = path.read_bytes()
        return Member(name, path, data, hashlib.sha256(data).hexdigest(), size)
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return Member(name, path, None, digest.hexdigest(), size)


@contextlib.contextmanager
def upload_entries(kind: str, path: Path, workdir: Path) -> Iterator[Iterator[Entry]]:
    """The upload's entries in order; their loads work until the context is left."""
    if kind == "dicom":
        yield iter([Entry("(body)", functools.partial(_file_member, "(body)", path))])
    elif kind == "multipart":
        parts = sorted(path.iterdir())
        yield iter(
            [
                Entry(f"part {n}", functools.partial(_file_member, f"part {n}", part))
                for n, part in enumerate(parts, 1)
            ]
        )
    else:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise bad_request(f"The body is not a readable zip archive: {error}") from error
        folder = workdir / "members"
        folder.mkdir(exist_ok=True)
        with archive:
            yield _zip_entries(archive, folder)


def _zip_entries(archive: zipfile.ZipFile, folder: Path) -> Iterator[Entry]:
    for index, info in enumerate(archive.infolist()):
        if info.is_dir():
            continue
        name = info.filename
        if name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
            skipped = Member(name, skipped="a DICOMDIR: the media's index, not an instance (PS3.10 8.6)")
            yield Entry(name, functools.partial(_given, skipped))
            continue
        yield Entry(name, functools.partial(_zip_member, archive, info, folder / f"{index:06d}"))


def _given(member: Member) -> Member:
    return member


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> Member:
    """Read one member: decompressed and CRC-checked by zipfile, hashed, in memory or in `target`."""
    name = info.filename
    try:
        if info.file_size <= IN_MEMORY_BYTES:
            # zipfile reads at most file_size bytes (a member that claims less cannot grow here)
            data: bytes | None = archive.read(info)
            assert data is not None
            digest, size, part10 = hashlib.sha256(data).hexdigest(), len(data), _part10(data[:132])
        else:
            data = None
            with archive.open(info) as source:
                digest, size, part10 = _hashed(source, target)
    except (
        zipfile.BadZipFile,
        zlib.error,  # a corrupt deflate stream
        NotImplementedError,  # a compression method zipfile lacks
        RuntimeError,  # an encrypted member
        OSError,
        EOFError,
        ValueError,
    ) as error:
        target.unlink(missing_ok=True)
        return Member(name, skipped=f"could not be read from the zip: {error}")
    if not part10 and not name.lower().endswith(".dcm"):
        target.unlink(missing_ok=True)
        return Member(name, skipped="not a DICOM Part 10 file (no DICM prefix)")
    return Member(name, None if data is not None else target, data, digest, size)
