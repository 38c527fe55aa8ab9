"""Typed, forgiving readers of DICOM JSON attributes (DICOM PS3.18 F.2).

Values come from a PACS we do not control: every reader returns None for a missing, empty or
malformed value instead of raising, so one odd attribute never costs a whole resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_facade.dicom_to_fhir.datetimes import fhir_date

__all__ = [
    "DicomJson",
    "date",
    "first_value",
    "integer",
    "person_name",
    "string",
    "strings",
]

DicomJson = Mapping[str, Any]
"""One DICOM JSON dataset: 8-hex-digit tag -> {"vr": ..., "Value": [...]} (PS3.18 F.2.2)."""

_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _values(ds: DicomJson, tag: str) -> list[Any]:
    element = ds.get(tag)
    if not isinstance(element, Mapping):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def first_value(ds: DicomJson, tag: str) -> Any | None:
    """The first entry of the Value array; None when the attribute is empty (PS3.18 F.2.5)."""
    values = _values(ds, tag)
    return values[0] if values else None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    text = str(value).strip()
    return text or None


def string(ds: DicomJson, tag: str) -> str | None:
    """The first value as a stripped string; None when empty (PS3.5 6.2 pads with spaces)."""
    return _text(first_value(ds, tag))


def strings(ds: DicomJson, tag: str) -> list[str]:
    """Every non-empty value of a multi-valued attribute, e.g. ModalitiesInStudy (0008,0061)."""
    return [text for text in (_text(value) for value in _values(ds, tag)) if text is not None]


def integer(ds: DicomJson, tag: str) -> int | None:
    """An IS/US/UL value as int (PS3.5 6.2: IS is a decimal string, Orthanc may send a number)."""
    value = first_value(ds, tag)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = _text(value)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def person_name(ds: DicomJson, tag: str) -> dict[str, str] | None:
    """The PN object {"Alphabetic", "Ideographic", "Phonetic"} (PS3.18 F.2.2), or None.

    A bare string (some encoders) is split on "=" into the three component groups (PS3.5 6.2).
    """
    value = first_value(ds, tag)
    if isinstance(value, str):
        groups = value.split("=")
        value = dict(zip(_PN_GROUPS, groups, strict=False))
    if not isinstance(value, Mapping):
        return None
    name = {group: text for group in _PN_GROUPS if (text := _text(value.get(group))) is not None}
    return name or None


def date(ds: DicomJson, tag: str) -> str | None:
    """A DA attribute as a FHIR date "YYYY-MM-DD"; None when empty or malformed (PS3.5 6.2)."""
    return fhir_date(string(ds, tag))
