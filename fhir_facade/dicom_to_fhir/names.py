"""DICOM PN -> FHIR HumanName (DICOM PS3.5 6.2 "PN", FHIR datatypes.html#HumanName).

A PN value has up to three component groups, Alphabetic, Ideographic and Phonetic (PS3.5 6.2.1),
each with five components family^given^middle^prefix^suffix. Each present group becomes one
HumanName; the Ideographic and Phonetic ones carry the R4 extension iso21090-EN-representation
(IDE / SYL) so a reader can tell the scripts apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["human_names", "name_text"]

_REPRESENTATION_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
_GROUPS: tuple[tuple[str, str | None], ...] = (
    ("Alphabetic", None),
    ("Ideographic", "IDE"),
    ("Phonetic", "SYL"),
)


def _components(group: str) -> list[str]:
    parts = [part.strip() for part in group.split("^")]
    parts += [""] * (5 - len(parts))
    return parts[:5]


def _human_name(group: str, representation: str | None) -> dict[str, Any] | None:
    family, given, middle, prefix, suffix = _components(group)
    if not any((family, given, middle, prefix, suffix)):
        return None
    name: dict[str, Any] = {}
    if representation is None:
        name["use"] = "official"
        # Western reading order for the alphabetic group.
        words = [prefix, given, middle, family, suffix]
    else:
        name["extension"] = [{"url": _REPRESENTATION_URL, "valueCode": representation}]
        # Ideographic/phonetic groups (CJK, PS3.5 Annex H-J) read family name first.
        words = [prefix, family, given, middle, suffix]
    name["text"] = " ".join(word for word in words if word)
    if family:
        name["family"] = family
    givens = [part for part in (given, middle) if part]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def human_names(pn: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One HumanName per non-empty PN component group; [] for an empty name such as "^^^"."""
    if not pn:
        return []
    names: list[dict[str, Any]] = []
    for key, representation in _GROUPS:
        group = pn.get(key)
        if isinstance(group, str) and (name := _human_name(group, representation)) is not None:
            names.append(name)
    return names


def name_text(pn: Mapping[str, Any] | None) -> str | None:
    """A readable form of the name (the first group's text), for Reference.display."""
    names = human_names(pn)
    return names[0]["text"] if names else None
