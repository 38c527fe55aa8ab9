"""DICOM UIDs as FHIR identifiers: system `urn:dicom:uid`, value `urn:oid:<UID>`.

The convention of FHIR R4 imagingstudy.html (ImagingStudy.identifier, "DICOM Study Instance UID")
and of the DICOM-SR-to-FHIR IG; stated once here for every module that writes or reads one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["DICOM_UID_SYSTEM", "OID_PREFIX", "uid_from_identifier", "uid_identifier"]

#: Identifier.system of a DICOM UID (FHIR R4 terminologies-systems.html).
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
#: RFC 3001: a UID written as a URI.
OID_PREFIX: Final = "urn:oid:"


def uid_identifier(uid: str) -> dict[str, str]:
    """The Identifier of a DICOM UID."""
    return {"system": DICOM_UID_SYSTEM, "value": f"{OID_PREFIX}{uid}"}


def uid_from_identifier(identifier: Mapping[str, Any]) -> str | None:
    """The UID an Identifier names (system urn:dicom:uid, value urn:oid:...), or None."""
    value = str(identifier.get("value") or "")
    if identifier.get("system") == DICOM_UID_SYSTEM and value.startswith(OID_PREFIX):
        return value.removeprefix(OID_PREFIX)
    return None
