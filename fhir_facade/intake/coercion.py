"""Coerce a dataset's patient and order identity, keeping what it said before (PS3.3 C.12.1.1.9).

A PACS that changes identifying attributes of an instance it receives (attribute *coercion*, PS3.4
B.4.1.3) or corrects them later records the previous values in the Original Attributes Sequence
(0400,0561): one item per modification, with when (0400,0562), which system (0400,0563), where the
previous values came from (0400,0564), why (0400,0565: defined terms COERCE, CORRECT) and the
previous values themselves in the Modified Attributes Sequence (0400,0550). This module does exactly
that and nothing else: no I/O, no FHIR.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Final, Literal

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = ["IDENTITY_KEYWORDS", "IdentityTarget", "coerce_identity", "dicom_datetime"]

Reason = Literal["COERCE", "CORRECT"]
"""Defined terms of Reason for the Attribute Modification (0400,0565) used here: COERCE when the
receiver replaces values on arrival, CORRECT when a later correction (reconciliation) does."""

IDENTITY_KEYWORDS: Final = {
    "patient_id": "PatientID",
    "issuer_of_patient_id": "IssuerOfPatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
}
"""IdentityTarget field -> DICOM keyword (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study)."""

_LO_MAX = 64


@dataclass(frozen=True)
class IdentityTarget:
    """What a study's identity should say. A field left None is not touched; "" empties it."""

    patient_id: str
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None
    """DICOM PN: Family^Given^Middle^Prefix^Suffix (PS3.5 6.2.1)."""
    patient_birth_date: str | None = None
    """DA: YYYYMMDD."""
    patient_sex: str | None = None
    """M, F or O (PS3.3 C.7.1.1: enumerated values), or "" for unknown."""
    accession_number: str | None = None

    def values(self) -> dict[str, str]:
        """Keyword -> value for the fields that are set."""
        return {
            IDENTITY_KEYWORDS[f.name]: value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }


def dicom_datetime(moment: datetime) -> str:
    """DT with seconds, microseconds and the UTC offset (PS3.5 6.2: YYYYMMDDHHMMSS.FFFFFF&ZZXX)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.strftime("%Y%m%d%H%M%S.%f%z")


def coerce_identity(
    ds: Dataset,
    target: IdentityTarget,
    *,
    modifying_system: str,
    source_of_previous_values: str = "",
    reason: Reason = "COERCE",
    when: datetime | None = None,
) -> tuple[str, ...]:
    """Set `ds`'s identity attributes to `target`'s and record the previous values.

    Only attributes whose value changes are touched. For them one item is appended to the Original
    Attributes Sequence, whose Modified Attributes Sequence holds each previous value as it was
    (an attribute that was absent is recorded with an empty value, so the item still says it had
    none). Returns the keywords changed; () means `ds` was left exactly as it was.
    """
    previous = Dataset()
    changed: list[str] = []
    for keyword, value in target.values().items():
        current = ds.get(keyword)
        if current is not None and str(current) == value:
            continue
        if keyword in ds:
            previous.add(copy.deepcopy(ds.data_element(keyword)))  # type: ignore[arg-type]
        else:
            setattr(previous, keyword, "")
        setattr(ds, keyword, value)
        changed.append(keyword)
    if not changed:
        return ()
    item = Dataset()
    item.AttributeModificationDateTime = dicom_datetime(when or datetime.now(UTC))
    item.ModifyingSystem = modifying_system[:_LO_MAX]
    item.SourceOfPreviousValues = source_of_previous_values[:_LO_MAX]
    item.ReasonForTheAttributeModification = reason
    item.ModifiedAttributesSequence = DicomSequence([previous])
    history = list(ds.get("OriginalAttributesSequence") or [])
    ds.OriginalAttributesSequence = DicomSequence([*history, item])
    return tuple(changed)
