"""STOW-RS requests through the proxy (DICOM PS3.18 10.5): the body read within a size limit, and,
for a patient-confined caller, every instance checked before a byte reaches the PACS.

The body is buffered because the decision needs every part (a store is all or nothing for the
caller: refusing after the PACS stored half of it would be too late), and the exact bytes are then
forwarded unchanged. Parts are parsed with `stop_before_pixels`, so checking costs the headers only.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from starlette.requests import Request

from fhir_facade.dicomweb.errors import DicomwebError
from fhir_facade.dicomweb.wado import parse_multipart_related
from fhir_facade.dicomweb_proxy.client import DicomwebProxyClient
from fhir_facade.dicomweb_proxy.confinement import PatientKey, PatientKeys, uids_of_other_patients
from fhir_facade.fhir.errors import (
    FhirError,
    Issue,
    bad_request,
    forbidden,
    unsupported_media_type,
)

__all__ = [
    "DEFAULT_MAX_STOW_BYTES",
    "StowInstance",
    "check_confined_stow",
    "payload_too_large",
    "read_body",
    "read_instances",
]

log = logging.getLogger(__name__)

#: Largest STOW-RS body the proxy accepts (it is held in memory while it is checked).
DEFAULT_MAX_STOW_BYTES = 256 * 1024 * 1024

_DICOM = "application/dicom"


def payload_too_large(limit: int) -> FhirError:
    """413: the body is larger than the proxy accepts (IssueType `too-long`)."""
    return FhirError(413, [Issue("too-long", f"The STOW-RS body exceeds the limit of {limit} bytes")])


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from the
    declared Content-Length before reading, else while reading (chunked uploads)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise payload_too_large(limit)
    return bytes(body)


@dataclass(frozen=True)
class StowInstance:
    """What the confinement check needs of one part: the patient and the three UIDs."""

    part: int
    patient_id: str | None
    issuer: str | None
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None

    @classmethod
    def from_dataset(cls, part: int, ds: Dataset) -> StowInstance:
        return cls(
            part,
            _text(ds, "PatientID"),
            _text(ds, "IssuerOfPatientID"),
            _text(ds, "StudyInstanceUID"),
            _text(ds, "SeriesInstanceUID"),
            _text(ds, "SOPInstanceUID"),
        )


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return (str(value).strip() or None) if value is not None else None


def read_instances(body: bytes, content_type: str) -> list[StowInstance]:
    """The parts of a multipart/related STOW-RS body as DICOM datasets without pixel data.

    Only Part 10 parts (`application/dicom`, PS3.18 8.6.1.1) can be checked; the metadata +
    bulkdata form of STOW-RS (`application/dicom+json` parts) is refused with 415.
    """
    if _media_type(content_type) != "multipart/related":
        raise unsupported_media_type(f"STOW-RS needs a multipart/related body, got {content_type!r}")
    try:
        parts = parse_multipart_related(body, content_type)
    except DicomwebError as exc:
        raise bad_request(f"Malformed multipart/related body: {exc}") from exc
    if not parts:
        raise bad_request("The STOW-RS body holds no instances")
    instances: list[StowInstance] = []
    for number, part in enumerate(parts, start=1):
        part_type = part.headers.get("content-type")
        if part_type is not None and _media_type(part_type) != _DICOM:
            raise unsupported_media_type(
                f"Part {number} is {part_type!r}; a patient-confined STOW-RS takes {_DICOM} parts only"
            )
        try:
            ds = pydicom.dcmread(io.BytesIO(part.content), stop_before_pixels=True)
            # Values are decoded here (character set included), so a bad one fails inside the try.
            instances.append(StowInstance.from_dataset(number, ds))
        except Exception as exc:  # pydicom raises many types on malformed input
            raise bad_request(f"Part {number} is not a readable DICOM file: {exc}") from exc
    return instances


async def check_confined_stow(
    pacs: DicomwebProxyClient, body: bytes, content_type: str, key: PatientKey | PatientKeys
) -> list[StowInstance]:
    """Refuse (403) a store by a caller confined to `key` unless every instance is `key`'s patient
    and none of its study, series or SOP instance UIDs already belongs to another patient.

    The second rule matters because the PACS keys studies by patient and UID: an instance of our
    patient stored under another patient's UID would make that patient's data ambiguous, which
    Orthanc answers by refusing to retrieve it (see `confinement`).
    """
    instances = read_instances(body, content_type)
    for instance in instances:
        if not key.matches(instance.patient_id, instance.issuer):
            raise forbidden(
                f"Part {instance.part} (SOP Instance {instance.sop_instance_uid}) is of patient "
                f"{instance.patient_id!r} (issuer {instance.issuer!r}); the token allows storing for "
                f"patient {key.describe()} only"
            )
    levels = (
        ("/studies", "StudyInstanceUID", "0020000D", "study", [i.study_uid for i in instances]),
        ("/series", "SeriesInstanceUID", "0020000E", "series", [i.series_uid for i in instances]),
        ("/instances", "SOPInstanceUID", "00080018", "SOP instance", [i.sop_instance_uid for i in instances]),
    )
    for path, keyword, tag, what, values in levels:
        uids = [uid for uid in values if uid]
        taken = await uids_of_other_patients(pacs, path, keyword, tag, uids, key)
        if taken:
            raise forbidden(
                f"The PACS holds {what} {', '.join(taken)} for another patient; "
                "storing under the same UID is not allowed"
            )
    return instances
