"""Which search parameters the store indexes, and extracting their values from a resource.

The parameters are the registry's (fhir_facade/fhir/registry.py): for every type the store keeps,
the R4 SearchParameters the facade serves, with the element paths of their expressions
(capability/search-parameters.json, generated from the R4 definitions). No FHIRPath engine: the
paths are walked by fhir/element_paths.py, and `where(resolve() is Patient)` is the parameter's
`resolves_to`: only references to those types are indexed for it.

Extraction turns each value into the row shape of its type (search.html): token -> (system, code);
date -> the UTC range [lower, upper) the value covers at its precision; reference -> (type, id,
reference string); string -> (normalised, exact), a HumanName or Address giving one row per part.

Every indexed type also has the Resource parameters `_id` (token) and `_lastUpdated` (date),
searched on `resource_current` columns rather than index rows, and a set of `_sort` keys
(`sortable_params`): `_id`, `_lastUpdated` and every indexed token, date and string parameter.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhir_facade.fhir.element_paths import values_at
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.registry import SearchParameterFacts, registry
from fhir_facade.fhir.required_bindings import required_bindings
from fhir_facade.fhir.search import SearchParamDef, SearchParamType, parse_date_value

__all__ = [
    "INDEXED_PARAMS",
    "PRIORITY_RANK",
    "PRIORITY_SORTED_PARAMS",
    "RESOURCE_PARAMS",
    "IndexRows",
    "IndexedParam",
    "extract_index",
    "normalize_string",
    "search_param_defs",
    "sortable_params",
]

#: Open ends of a Period (period.html: a missing start/end means unknown or ongoing).
DATE_MIN = datetime(1, 1, 1, tzinfo=UTC)
DATE_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

#: One indexed search parameter of one type: the registry's facts.
IndexedParam = SearchParameterFacts

#: Every indexed search parameter, per resource type (the registry's stored types and Patient
#: records; the Resource parameters `_id`/`_lastUpdated` are columns, not index rows).
INDEXED_PARAMS: dict[str, tuple[IndexedParam, ...]] = {
    resource_type: tuple(p for p in registry()[resource_type].search_params if not p.name.startswith("_"))
    for resource_type in registry().indexed_types
}


#: The Resource parameters every indexed type has (search.html#all), on `resource_current`.
RESOURCE_PARAMS: dict[str, SearchParamDef] = {
    "_id": SearchParamDef(
        "_id",
        SearchParamType.TOKEN,
        "Logical id of this artifact",
        definition="http://hl7.org/fhir/SearchParameter/Resource-id",
    ),
    "_lastUpdated": SearchParamDef(
        "_lastUpdated",
        SearchParamType.DATE,
        "When the resource version last changed",
        definition="http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
    ),
}

#: The ValueSet whose codes `_sort` orders by rank, not by text (docs/adr/0004-persistent-store.md,
#: "Sorting"): routine < urgent < asap < stat (R4 request-priority).
_REQUEST_PRIORITY = "http://hl7.org/fhir/ValueSet/request-priority"
PRIORITY_RANK: dict[str, int] = {"routine": 1, "urgent": 2, "asap": 3, "stat": 4}


def _priority_sorted() -> frozenset[tuple[str, str]]:
    """The (type, parameter) pairs on a code bound to request-priority (Task.priority, ...)."""
    bindings = required_bindings().bindings
    return frozenset(
        (resource_type, p.name)
        for resource_type, params in INDEXED_PARAMS.items()
        for p in params
        if p.type is SearchParamType.TOKEN
        and p.paths
        and all(bindings.get(path, "").split("|")[0] == _REQUEST_PRIORITY for path in p.paths)
    )


PRIORITY_SORTED_PARAMS = _priority_sorted()

_SORTABLE_TYPES = frozenset({SearchParamType.TOKEN, SearchParamType.DATE, SearchParamType.STRING})


def search_param_defs(resource_type: str) -> dict[str, SearchParamDef]:
    """The parser definitions (for `parse_search`) of the parameters searchable for a type: the
    indexed ones plus `_id` and `_lastUpdated` (none for a type without indexes)."""
    if resource_type not in INDEXED_PARAMS:
        return {}
    return {**RESOURCE_PARAMS, **{p.name: p.search_param_def() for p in INDEXED_PARAMS[resource_type]}}


def sortable_params(resource_type: str) -> frozenset[str]:
    """The `_sort` keys (without `-`) the store can order a type by: `_id`, `_lastUpdated` and
    each indexed token, date or string parameter (references and others are not sortable)."""
    if resource_type not in INDEXED_PARAMS:
        return frozenset()
    indexed = (p.name for p in INDEXED_PARAMS[resource_type] if p.type in _SORTABLE_TYPES)
    return frozenset({*RESOURCE_PARAMS, *indexed})


@dataclass
class IndexRows:
    """The index rows of one resource version, per search type (param name first in each tuple)."""

    tokens: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    dates: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    references: list[tuple[str, str | None, str | None, str]] = field(default_factory=list)
    strings: list[tuple[str, str, str]] = field(default_factory=list)


def normalize_string(value: str) -> str:
    """Fold case and accents and collapse whitespace: search.html#string says the default match
    "is case- and accent-insensitive"."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())


def _tokens(value: Any) -> Iterator[tuple[str | None, str | None]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value:  # CodeableConcept
            for coding in value["coding"]:
                yield from _tokens(coding)
        elif "code" in value:  # Coding
            yield value.get("system"), value["code"]
        elif "value" in value:  # Identifier
            yield value.get("system"), value["value"]


def _date_range(value: str) -> tuple[datetime, datetime] | None:
    try:
        parsed = parse_date_value(value, name="value", allowed_prefixes=("eq",))
    except FhirError:
        return None
    lower, upper = parsed.lower, parsed.upper
    # A date without an offset (a `date`, or a dateTime missing one) is taken as UTC, matching
    # how the search side reads naive values.
    if lower.tzinfo is None:
        lower, upper = lower.replace(tzinfo=UTC), upper.replace(tzinfo=UTC)
    return lower.astimezone(UTC), upper.astimezone(UTC)


def _dates(value: Any) -> Iterator[tuple[datetime, datetime]]:
    if isinstance(value, str):
        bounds = _date_range(value)
        if bounds:
            yield bounds
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = _date_range(value["start"]) if "start" in value else None
        end = _date_range(value["end"]) if "end" in value else None
        yield (start[0] if start else DATE_MIN), (end[1] if end else DATE_MAX)
    elif isinstance(value, dict) and "event" in value:  # Timing: its listed events
        for event in value["event"]:
            yield from _dates(event)


def _strings(value: Any) -> Iterator[str]:
    """The strings a string parameter matches in a value: the value itself, or every part of a
    HumanName or Address (search.html#string: "any of the string fields")."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state"):
            part = value.get(key)
            for item in part if isinstance(part, list) else [part]:
                if isinstance(item, str):
                    yield item


def _reference(value: Any) -> tuple[str | None, str | None, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return None
    reference: str = value["reference"]
    if reference.startswith("#"):
        return None  # contained resource: not searchable by id
    if ":" in reference:
        # Absolute URL or urn:uuid: `Type/id` search values mean *this* server's resources
        # (search.html#reference), so an absolute reference only matches by its full URL.
        return None, None, reference
    segments = reference.split("/")
    if len(segments) == 4 and segments[2] == "_history":
        segments = segments[:2]
    if len(segments) == 2 and segments[0][:1].isupper():
        return segments[0], segments[1], reference
    return None, None, reference


def extract_index(resource: dict[str, Any]) -> IndexRows:
    """Index rows for every parameter of the resource's type (none for unindexed types)."""
    rows = IndexRows()
    for param in INDEXED_PARAMS.get(resource["resourceType"], ()):
        for path in param.paths:
            for value in values_at(resource, path):
                if param.type is SearchParamType.TOKEN:
                    rows.tokens.extend((param.name, s, c) for s, c in _tokens(value))
                elif param.type is SearchParamType.DATE:
                    rows.dates.extend((param.name, lo, up) for lo, up in _dates(value))
                elif param.type is SearchParamType.REFERENCE:
                    ref = _reference(value)
                    if ref and (not param.resolves_to or ref[0] in param.resolves_to):
                        rows.references.append((param.name, *ref))
                elif param.type is SearchParamType.STRING:
                    rows.strings.extend((param.name, normalize_string(v), v) for v in _strings(value))
    return rows
