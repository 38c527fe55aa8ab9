"""STOW-RS requests through the proxy (DICOM PS3.18 10.5): the body read within a size limit and
split strictly (`multipart`), every instance read, and, for a patient-confined caller, every
instance checked before a byte reaches the PACS.

The body is read whole before anything is sent because the decision needs every part (a store is
all or nothing for the caller: refusing after the PACS stored half of it would be too late). The
PACS then gets a body the proxy wrote itself from the parts it read (`CanonicalBody`), never the
client's bytes, so no framing trick can hand the PACS a part that was not checked.

Each instance is read whole (pixel data and other large values deferred, not loaded), so an
attribute placed after the pixel data is seen too, and its top-level elements must come in
ascending tag order without repeats (PS3.5 7.1): pydicom keeps the last of two equal tags, other
toolkits the first, so a repeated PatientID would let the check and the PACS see different
patients. A dataset encoded in another VR form than its transfer syntax names is refused for the
same reason (pydicom guesses the form; another toolkit may guess otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from starlette.requests import Request

from fhir_facade.auth.errors import forbidden
from fhir_facade.dicomweb_proxy.client import DicomwebProxyClient
from fhir_facade.dicomweb_proxy.confinement import PatientKey, PatientKeys, uids_of_other_patients
from fhir_facade.dicomweb_proxy.multipart import StowPart, StowReader, parse_stow_content_type
from fhir_facade.fhir.errors import FhirError, Issue, bad_request

__all__ = [
    "DEFAULT_MAX_STOW_BYTES",
    "StowInstance",
    "check_confined_stow",
    "payload_too_large",
    "read_instances",
    "read_stow_body",
]

log = logging.getLogger(__name__)

#: Largest STOW-RS body the proxy accepts (part contents are spooled, see `multipart`).
DEFAULT_MAX_STOW_BYTES = 256 * 1024 * 1024

# Values larger than this are skipped while an instance is read (pydicom `defer_size`).
_DEFER_SIZE = 64 * 1024


def payload_too_large(limit: int) -> FhirError:
    """413: the body is larger than the proxy accepts (IssueType `too-long`)."""
    return FhirError(413, [Issue("too-long", f"The STOW-RS body exceeds the limit of {limit} bytes")])


async def read_stow_body(request: Request, limit: int) -> StowReader:
    """The request's multipart/related body split into parts, refused with 413 as soon as it is
    known to exceed `limit` bytes (from Content-Length before reading, else while reading), and
    with 400/415 as soon as its Content-Type or framing is wrong. The caller closes the reader."""
    boundary = parse_stow_content_type(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    reader = StowReader(boundary)
    try:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise payload_too_large(limit)
            reader.feed(chunk)
        reader.finish()
    except BaseException:
        reader.close()
        raise
    return reader


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


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return (str(value).strip() or None) if value is not None else None


class _TagOrderError(ValueError):
    pass


def _ascending_tags() -> Callable[[BaseTag, str | None, int], bool]:
    """A pydicom `stop_when` that never stops but refuses a top-level tag not above the last."""
    last, seen = -1, 0

    def check(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal last, seen
        if int(tag) <= last:
            if seen == 1 and int(tag) == last:
                # pydicom asks about the first element twice when it finds the dataset encoded in
                # another VR form than the transfer syntax says (and reads on in the form found):
                # a guess other toolkits need not make the same way.
                raise _TagOrderError("its dataset is not encoded as its transfer syntax says")
            raise _TagOrderError(f"element {tag} follows {BaseTag(last)}: not in ascending order")
        last, seen = int(tag), seen + 1
        return False

    return check


def _read_instance(reader: StowReader, part: StowPart) -> StowInstance:
    try:
        with reader.open_part(part) as content:
            ds = read_partial(content, stop_when=_ascending_tags(), defer_size=_DEFER_SIZE)
            # Values are decoded here (character set included), so a bad one fails inside the try.
            return StowInstance.from_dataset(part.number, ds)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise bad_request(f"Part {part.number} is not a readable DICOM file: {exc}") from exc


def read_instances(reader: StowReader) -> list[StowInstance]:
    """Every part of a split STOW-RS body read as a DICOM Part 10 file (PS3.18 8.6.1.1); 400 for
    the first that is not one."""
    return [_read_instance(reader, part) for part in reader.parts]


async def check_confined_stow(
    pacs: DicomwebProxyClient, instances: list[StowInstance], key: PatientKey | PatientKeys
) -> None:
    """Refuse (403) a store by a caller confined to `key` unless every instance is `key`'s patient,
    names its study, series and SOP instance, and none of those UIDs already belongs to another
    patient.

    The last rule matters because the PACS keys studies by patient and UID: an instance of our
    patient stored under another patient's UID would make that patient's data ambiguous, which
    Orthanc answers by refusing to retrieve it (see `confinement`). The refusal names the instance
    by its position and never the other patient's UIDs (their existence is the PACS's business).
    """
    for instance in instances:
        if not key.matches(instance.patient_id, instance.issuer):
            log.info("STOW-RS instance %d is not patient %s's", instance.part, key.describe())
            raise _not_for_patient(instance.part, key, "it is not this patient's instance")
        if not (instance.study_uid and instance.series_uid and instance.sop_instance_uid):
            raise bad_request(
                f"STOW-RS instance {instance.part} lacks its StudyInstanceUID, SeriesInstanceUID "
                "or SOPInstanceUID"
            )
    levels = (
        ("/studies", "StudyInstanceUID", "0020000D", "study", lambda i: i.study_uid),
        ("/series", "SeriesInstanceUID", "0020000E", "series", lambda i: i.series_uid),
        ("/instances", "SOPInstanceUID", "00080018", "SOP instance", lambda i: i.sop_instance_uid),
    )
    for path, keyword, tag, what, uid_of in levels:
        uids = [str(uid_of(instance)) for instance in instances]
        taken = set(await uids_of_other_patients(pacs, path, keyword, tag, uids, key))
        refused = [instance.part for instance in instances if uid_of(instance) in taken]
        if refused:
            log.info("STOW-RS instance(s) %s: %s UID held for another patient", refused, what)
            raise _not_for_patient(refused[0], key, f"its {what} UID is not available to this patient")


def _not_for_patient(part: int, key: PatientKey | PatientKeys, reason: str) -> FhirError:
    return forbidden(f"STOW-RS instance {part} may not be stored for patient {key.describe()}: {reason}")
