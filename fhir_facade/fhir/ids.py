"""The FHIR id datatype (R4 datatypes.html#id): 1-64 of `[A-Za-z0-9\\-\\.]`.

The one definition: logical ids in URLs, stored ids, ids derived from DICOM UIDs and patient ids,
registry entries and audit records are all checked with `is_fhir_id`.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["FHIR_ID_PATTERN", "RESOURCE_TYPE_PATTERN", "is_fhir_id"]

#: R4 datatypes.html#id, unanchored, for building larger patterns.
FHIR_ID_PATTERN: Final = r"[A-Za-z0-9\-.]{1,64}"
#: A resource type name as it appears in a reference or URL (an upper-case letter, then letters).
RESOURCE_TYPE_PATTERN: Final = r"[A-Z][A-Za-z]{1,63}"

_FHIR_ID: Final = re.compile(FHIR_ID_PATTERN)


def is_fhir_id(value: str) -> bool:
    """Whether `value` is a valid FHIR id, the whole string (no trailing newline slips through)."""
    return _FHIR_ID.fullmatch(value) is not None
