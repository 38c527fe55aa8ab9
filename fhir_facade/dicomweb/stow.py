"""Async STOW-RS client (DICOM PS3.18 10.5 Store Transaction) over one shared httpx connection pool.

Used to write results back to the PACS (the AI SR). Like the QIDO client, it converts transport
failures and PACS errors here, at the boundary: 5xx and transport errors become
`DicomwebUnavailable` (retry later), a 4xx or any instance the PACS did not store becomes
`StowRejected` carrying the per-instance Failure Reasons (PS3.18 Table 10.5.3-1 response module).

What Orthanc 1.10.1 + DICOMweb plugin 1.7 answers (checked against the real server):
200 with ReferencedSOPSequence (0008,1199) when all are stored; 409 with FailedSOPSequence
(0008,1198), FailureReason 0x0110, for an instance outside the study named in the URL; 400 with
FailureReason 0xC000 for a dataset missing a mandatory tag, and 400 with an empty FailedSOPSequence
for a part that is not DICOM at all (the good parts of the same request are stored all the same).
Its 4xx answers carry DICOM JSON without a Content-Type header. A body whose boundary does not
match the header is answered 200 with nothing stored: success is only what ReferencedSOPSequence
lists, so every instance sent is checked against it.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from fhir_facade.dicomweb.client import DicomJson
from fhir_facade.dicomweb.errors import DicomwebError
from fhir_facade.dicomweb.pooled_client import PooledClient

__all__ = [
    "FAILURE_REASONS",
    "FailedInstance",
    "StoredInstance",
    "StowClient",
    "StowRejected",
    "StowResult",
]

log = logging.getLogger(__name__)

#: Failure Reason (0008,1197) values a STOW-RS origin server uses (PS3.18 10.5.3: the C-STORE
#: failure statuses of PS3.4 Annex B plus the general 0x0110), for messages people can read.
FAILURE_REASONS: dict[int, str] = {
    0x0110: "Processing failure",
    0x0122: "Referenced SOP Class not supported",
    0x0124: "Refused: not authorized",
    0x0211: "Unrecognized operation",
    0xA700: "Refused: out of resources",
    0xA900: "Error: data set does not match SOP Class",
    0xC000: "Error: cannot understand",
    0xC122: "Referenced Transfer Syntax not supported",
}

# DICOM JSON keys of the Store Instances Response Module (PS3.18 Table 10.5.3-1).
_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


@dataclass(frozen=True)
class StoredInstance:
    """One instance the PACS says it stored (an item of ReferencedSOPSequence)."""

    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str | None = None
    warning_reason: int | None = None
    """(0008,1196): e.g. 0xB000 when the PACS coerced attributes; stored all the same."""


@dataclass(frozen=True)
class FailedInstance:
    """One instance the PACS refused (an item of FailedSOPSequence)."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int | None

    @property
    def reason_text(self) -> str:
        if self.reason is None:
            return "no reason given"
        return f"0x{self.reason:04X} {FAILURE_REASONS.get(self.reason, 'unknown failure reason')}"


@dataclass(frozen=True)
class StowResult:
    """The PACS's answer to one store transaction."""

    status: int
    retrieve_url: str | None
    """The study's RetrieveURL (0008,1190) when the PACS gives one."""
    stored: tuple[StoredInstance, ...]
    failed: tuple[FailedInstance, ...] = ()
    unreported: tuple[str, ...] = ()
    """SOP Instance UIDs sent but neither listed as stored nor as failed."""


class StowRejected(DicomwebError):
    """The PACS did not store every instance: a 4xx answer, failed instances, or silence.

    `result` holds what the PACS did store (a partial success is possible: Orthanc keeps the good
    instances of a request it answers 400), so a caller can report or clean up precisely.
    """

    def __init__(self, message: str, result: StowResult) -> None:
        super().__init__(message)
        self.result = result

    @property
    def status(self) -> int:
        return self.result.status

    @property
    def failed(self) -> tuple[FailedInstance, ...]:
        return self.result.failed

    @property
    def reasons(self) -> tuple[int | None, ...]:
        return tuple(item.reason for item in self.result.failed)


class StowClient(PooledClient):
    """STOW-RS Store Instances (PS3.18 10.5) for pydicom datasets, opened in the application
    lifespan like `DicomwebClient`."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        max_connections: int = 4,
        auth: tuple[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        super().__init__(
            base_url, timeout=timeout, max_connections=max_connections, auth=auth, transport=transport
        )

    async def store(self, datasets: Sequence[Dataset], study_uid: str | None = None) -> StowResult:
        """Store `datasets` in one request to `/studies` or `/studies/{study_uid}` (PS3.18 10.5.1).

        With `study_uid` the PACS refuses instances of other studies (a safety net for write-back:
        an SR must land in the study it reports on). Raises `StowRejected` unless every dataset
        is listed as stored, `DicomwebUnavailable` on 5xx, timeout or no connection.
        """
        if not datasets:
            raise ValueError("datasets must not be empty")
        parts = [_encode_part(ds, index) for index, ds in enumerate(datasets)]
        sent = [str(ds.SOPInstanceUID) for ds in datasets]
        boundary = _boundary(parts)
        body = _multipart_body(parts, boundary)
        path = "/studies" if study_uid is None else f"/studies/{study_uid}"
        headers = {
            # PS3.18 8.6.1.1: multipart/related with type= naming the media type of every part.
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        response = await self._send("POST", path, content=body, headers=headers)
        result = _parse_response(response, sent)
        if response.status_code >= 400 or result.failed or result.unreported:
            raise StowRejected(_rejection_message(path, result), result)
        if "warning" in response.headers:
            log.warning("STOW %s: PACS warning %s", path, response.headers["warning"])
        return result


def _encode_part(ds: Dataset, index: int) -> bytes:
    """One dataset as a DICOM file (PS3.10): what an application/dicom part must hold.

    A dataset built in memory often has no file meta; it gets Explicit VR Little Endian and
    meta derived from its SOP UIDs. The caller's dataset is not modified (a shallow copy is
    written, sharing element values such as PixelData).
    """
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise ValueError(f"datasets[{index}] has no SOPClassUID/SOPInstanceUID")
    meta = FileMetaDataset(getattr(ds, "file_meta", FileMetaDataset()))
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    shallow = Dataset(ds)
    shallow.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, shallow, enforce_file_format=True)
    return buffer.getvalue()


def _boundary(parts: Sequence[bytes]) -> str:
    """A random boundary that occurs in no part (RFC 2046 5.1.1)."""
    while True:
        boundary = uuid.uuid4().hex
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary


def _multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """RFC 2387 multipart/related: the CRLF before each delimiter belongs to the delimiter."""
    delimiter = f"--{boundary}".encode("ascii")
    chunks: list[bytes] = []
    for part in parts:
        chunks += [delimiter, b"\r\nContent-Type: application/dicom\r\n\r\n", part, b"\r\n"]
    chunks += [delimiter, b"--\r\n"]
    return b"".join(chunks)


def _parse_response(response: httpx.Response, sent: Sequence[str]) -> StowResult:
    """Read the Store Instances Response Module; tolerate a body that is not DICOM JSON.

    The body is parsed whatever the Content-Type, since Orthanc sends its 4xx DICOM JSON without
    one; a non-DICOM body (e.g. Orthanc's own 415 error JSON) yields no stored instances.
    """
    body: Any = None
    if response.content:
        try:
            body = response.json()
        except ValueError:
            body = None
    if not isinstance(body, dict):
        body = {}
    stored = tuple(
        StoredInstance(
            sop_class_uid=_first(item, _REFERENCED_SOP_CLASS_UID) or "",
            sop_instance_uid=_first(item, _REFERENCED_SOP_INSTANCE_UID) or "",
            retrieve_url=_first(item, _RETRIEVE_URL),
            warning_reason=_first_int(item, _WARNING_REASON),
        )
        for item in _items(body, _REFERENCED_SOP_SEQUENCE)
    )
    failed = tuple(
        FailedInstance(
            sop_class_uid=_first(item, _REFERENCED_SOP_CLASS_UID),
            sop_instance_uid=_first(item, _REFERENCED_SOP_INSTANCE_UID),
            reason=_first_int(item, _FAILURE_REASON),
        )
        for item in _items(body, _FAILED_SOP_SEQUENCE)
    )
    reported = {item.sop_instance_uid for item in stored} | {item.sop_instance_uid for item in failed}
    return StowResult(
        status=response.status_code,
        retrieve_url=_first(body, _RETRIEVE_URL),
        stored=stored,
        failed=failed,
        unreported=tuple(uid for uid in sent if uid not in reported),
    )


def _rejection_message(path: str, result: StowResult) -> str:
    details = [
        f"{item.sop_instance_uid or '(unknown instance)'}: {item.reason_text}" for item in result.failed
    ]
    if result.unreported:
        details.append(f"not stored, no reason given: {', '.join(result.unreported)}")
    summary = "; ".join(details) or "no details"
    return f"PACS answered {result.status} to STOW {path}, {len(result.stored)} stored; {summary}"


def _items(dataset: DicomJson, key: str) -> list[DicomJson]:
    element = dataset.get(key)
    values = element.get("Value", []) if isinstance(element, dict) else []
    return [item for item in values if isinstance(item, dict)]


def _first(dataset: DicomJson, key: str) -> str | None:
    element = dataset.get(key)
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


def _first_int(dataset: DicomJson, key: str) -> int | None:
    element = dataset.get(key)
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], int):
        return values[0]
    return None
