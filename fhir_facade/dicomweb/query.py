"""QIDO-RS query algebra (DICOM PS3.18 8.3.4, PS3.4 C.2.2.2): attribute constraints that can be
ANDed, rendered as QIDO query values, and re-checked on the returned DICOM JSON.

Re-checking matters: a PACS may answer a superset (it may ignore a key, match case-insensitively
or treat `*`/`?` as wildcards), and a constraint whose values cannot be written safely in a query
is left out of it and only checked afterwards (`QidoQuery.widened`).

Orthanc 1.10 + DICOMweb 1.7 answers no PatientName matches over QIDO (checked: `Doe*`, `*oe*` and
the exact value all return nothing), so names are never sent: name search filters in the facade.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

__all__ = ["DateRange", "OneOf", "QidoQuery", "conjoin", "dicom_date", "tag_values"]

# Attributes the PACS computes from the series instead of indexing: Orthanc applies limit/offset
# before filtering on them (checked: ModalitiesInStudy=MR,CT has 7 matches, yet limit=2&offset=2
# returns none), so a query using them cannot be paged in the PACS.
COMPUTED_ATTRIBUTES = frozenset({"ModalitiesInStudy"})

# Characters with a meaning in QIDO/C-FIND values: wildcards, list and multi-value separators.
_UNSAFE = frozenset("*?,\\")


def tag_values(ds: Mapping[str, Any], tag: str) -> list[Any]:
    """The Value list of a DICOM JSON attribute ([] when absent or empty)."""
    element = ds.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def dicom_date(value: date) -> str:
    return value.strftime("%Y%m%d")


@dataclass(frozen=True)
class OneOf:
    """Single-value or list matching: the attribute equals one of `values` (any of, for multi-valued
    attributes such as ModalitiesInStudy). Orthanc accepts comma-separated lists for UIDs and codes."""

    values: frozenset[str]

    def merge(self, other: Constraint) -> Constraint | None:
        if not isinstance(other, OneOf):
            return None
        common = self.values & other.values
        return OneOf(common) if common else None

    @property
    def qido_safe(self) -> bool:
        return not any(_UNSAFE & set(v) for v in self.values)

    def qido(self, separator: str = ",") -> str:
        return separator.join(sorted(self.values))

    def matches(self, ds: Mapping[str, Any], tag: str) -> bool:
        return any(str(v).strip() in self.values for v in tag_values(ds, tag))


@dataclass(frozen=True)
class DateRange:
    """DA range matching, inclusive, either end open (PS3.4 C.2.2.2.5)."""

    first: date | None = None
    last: date | None = None

    def merge(self, other: Constraint) -> Constraint | None:
        if not isinstance(other, DateRange):
            return None
        firsts = [d for d in (self.first, other.first) if d]
        lasts = [d for d in (self.last, other.last) if d]
        merged = DateRange(max(firsts) if firsts else None, min(lasts) if lasts else None)
        if merged.first and merged.last and merged.first > merged.last:
            return None
        return merged

    qido_safe = True

    def qido(self, separator: str = ",") -> str:
        first = dicom_date(self.first) if self.first else ""
        last = dicom_date(self.last) if self.last else ""
        return first if self.first == self.last else f"{first}-{last}"

    def matches(self, ds: Mapping[str, Any], tag: str) -> bool:
        values = tag_values(ds, tag)
        if not values:
            return False
        raw = str(values[0]).strip()
        if len(raw) != 8 or not raw.isdigit():
            return False
        text = f"{raw[:4]}-{raw[4:6]}-{raw[6:]}"
        try:
            value = date.fromisoformat(text)
        except ValueError:
            return False
        return (self.first is None or value >= self.first) and (self.last is None or value <= self.last)


Constraint = OneOf | DateRange


@dataclass(frozen=True)
class QidoQuery:
    """A conjunction of constraints on attributes (by 8-hex-digit tag or keyword)."""

    constraints: Mapping[str, Constraint] = field(default_factory=dict)

    @property
    def widened(self) -> bool:
        """True when some constraint cannot be sent and is only checked on the results."""
        return not all(c.qido_safe for c in self.constraints.values())

    @property
    def pageable(self) -> bool:
        """Whether QIDO limit/offset give correct pages for this query."""
        return not (COMPUTED_ATTRIBUTES & set(self.constraints))

    def params(self, separator: str = ",") -> dict[str, str]:
        """Query values; lists joined by `separator` ("," in QIDO URLs, "\\" in C-FIND style
        queries such as Orthanc's /tools/find)."""
        return {k: c.qido(separator) for k, c in self.constraints.items() if c.qido_safe}

    def matches(self, ds: Mapping[str, Any], tag_of: Callable[[str], str]) -> bool:
        """Re-check every constraint on a result; `tag_of` maps keywords to DICOM JSON tags."""
        return all(c.matches(ds, tag_of(k)) for k, c in self.constraints.items())


def conjoin(left: QidoQuery, right: QidoQuery) -> QidoQuery | None:
    """AND two queries; None when they cannot both hold (e.g. disjoint UID lists or date ranges)."""
    merged: dict[str, Constraint] = dict(left.constraints)
    for key, constraint in right.constraints.items():
        existing = merged.get(key)
        if existing is None:
            merged[key] = constraint
            continue
        combined = existing.merge(constraint)
        if combined is None:
            return None
        merged[key] = combined
    return QidoQuery(merged)
