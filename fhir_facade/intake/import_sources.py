"""An import's upload, as files on disk, one per candidate instance (never the whole body in memory).

Three bodies are taken (ADR 0038): `application/dicom` (one Part 10 file), `multipart/related;
type="application/dicom"` (the STOW-RS body, split by the proxy's strict reader, ADR 0014) and
`application/zip` (folders nested at any depth, a DICOMDIR, files of any other kind). The body is
written to a temporary file in chunks as it arrives; a zip's members are then read one at a time
from that file (zipfile needs a seekable file, and a zip's directory is at its end) and copied to
their own files, hashed on the way. What is not an instance is reported, not refused: a DICOMDIR
(the media's index, PS3.10 8.6), a directory entry, a file that is not DICOM Part 10.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fhir_facade.dicomweb_proxy.multipart import StowReader, parse_stow_content_type
from fhir_facade.fhir.errors import bad_request, unsupported_media_type
from fhir_facade.intake.validation import DICM_OFFSET

__all__ = ["IMPORT_MEDIA_TYPES", "Member", "body_kind", "members_of", "spool_body"]

IMPORT_MEDIA_TYPES = ("application/dicom", "multipart/related", "application/zip")
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Member:
    """One entry of the upload: a candidate instance at `path`, or something `skipped` (and why)."""

    name: str
    path: Path | None = None
    sha256: str = ""
    size: int = 0
    skipped: str | None = None


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


def _copy_hashed(source: IO[bytes], target: Path) -> tuple[str, int, bool]:
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
    return digest.hexdigest(), size, head[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def members_of(kind: str, path: Path, workdir: Path) -> Iterator[Member]:
    """The upload's entries, one at a time, each instance in its own file under `workdir`."""
    if kind == "dicom":
        digest, size = _hash_file(path)
        yield Member("(body)", path, digest, size)
    elif kind == "multipart":
        for index, part in enumerate(sorted(path.iterdir())):
            digest, size = _hash_file(part)
            yield Member(f"part {index + 1}", part, digest, size)
    else:
        yield from _zip_members(path, workdir)


def _zip_members(path: Path, workdir: Path) -> Iterator[Member]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise bad_request(f"The body is not a readable zip archive: {error}") from error
    folder = workdir / "members"
    folder.mkdir(exist_ok=True)
    with archive:
        for index, info in enumerate(archive.infolist()):
            name = info.filename
            if info.is_dir():
                continue
            base = name.rsplit("/", 1)[-1]
            if base.upper() == "DICOMDIR":
                yield Member(name, skipped="a DICOMDIR: the media's index, not an instance (PS3.10 8.6)")
                continue
            target = folder / f"{index:06d}"
            try:
                with archive.open(info) as source:
                    digest, size, part10 = _copy_hashed(source, target)
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError, ValueError) as error:
                target.unlink(missing_ok=True)
                yield Member(name, skipped=f"could not be read from the zip: {error}")
                continue
            if not part10 and not base.lower().endswith(".dcm"):
                target.unlink()
                yield Member(name, skipped="not a DICOM Part 10 file (no DICM prefix)")
                continue
            yield Member(name, target, digest, size)
