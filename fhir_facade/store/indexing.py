"""Which search parameters the store indexes, and extracting their values from a resource.

The table below is declarative: parameter name -> simple dotted path(s) (FHIRPath subset: child
steps only, arrays flattened, `name[x]` for a choice element) and FHIR search type, as in the R4
SearchParameter expressions (searchparameter-registry.html) for the parameters we serve. No FHIRPath
engine: `where(resolve() is Patient)` becomes `target_types=("Patient",)`.

Extraction turns each value into the row shape of its type (search.html): token -> (system, code);
date -> the UTC range [lower, upper) the value covers at its precision; reference -> (type, id,
reference string); string -> (normalised, exact).

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

from fhir_facade.fhir.errors import FhirError
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


@dataclass(frozen=True)
class IndexedParam:
    """One search parameter of one resource type, with the element path(s) it indexes."""

    resource_type: str
    name: str
    type: SearchParamType
    paths: tuple[str, ...]
    documentation: str
    target_types: tuple[str, ...] = ()

    def definition(self) -> SearchParamDef:
        """The parser's view of this parameter (FHIR search.html#modifiers for what is allowed)."""
        modifiers: frozenset[str] = frozenset()
        if self.type is SearchParamType.STRING:
            modifiers = frozenset({"exact", "contains"})
        elif self.type is SearchParamType.REFERENCE:
            modifiers = frozenset(self.target_types)
        return SearchParamDef(
            self.name, self.type, self.documentation, modifiers=modifiers, target_types=self.target_types
        )


def _p(
    resource_type: str,
    name: str,
    type_: SearchParamType,
    *paths: str,
    doc: str,
    targets: tuple[str, ...] = (),
) -> IndexedParam:
    return IndexedParam(
        resource_type, name, type_, tuple(f"{resource_type}.{p}" for p in paths), doc, targets
    )


_T, _D, _R, _S = (
    SearchParamType.TOKEN,
    SearchParamType.DATE,
    SearchParamType.REFERENCE,
    SearchParamType.STRING,
)


def _clinical(resource_type: str) -> tuple[IndexedParam, ...]:
    """The parameters DiagnosticReport and Observation share (R4 clinical-* and own)."""
    return (
        _p(resource_type, "identifier", _T, "identifier", doc="A business identifier"),
        _p(resource_type, "status", _T, "status", doc="The status of the result"),
        _p(resource_type, "code", _T, "code", doc="What was observed / reported"),
        _p(resource_type, "category", _T, "category", doc="The category of the result"),
        _p(resource_type, "subject", _R, "subject", doc="Who or what the result is about"),
        _p(
            resource_type,
            "patient",
            _R,
            "subject",
            doc="The patient the result is about",
            targets=("Patient",),
        ),
        _p(resource_type, "date", _D, "effective[x]", doc="The clinically relevant time (effective[x])"),
        _p(resource_type, "based-on", _R, "basedOn", doc="The order this result fulfils"),
    )


#: Every indexed search parameter, per resource type.
INDEXED_PARAMS: dict[str, tuple[IndexedParam, ...]] = {
    "Task": (
        _p(
            "Task",
            "identifier",
            _T,
            "identifier",
            doc="Search for a task instance by its business identifier",
        ),
        _p("Task", "status", _T, "status", doc="Search by task status"),
        _p("Task", "intent", _T, "intent", doc="Search by task intent"),
        _p("Task", "priority", _T, "priority", doc="Search by task priority"),
        _p("Task", "code", _T, "code", doc="Search by task code"),
        _p("Task", "business-status", _T, "businessStatus", doc="Search by business status"),
        _p("Task", "focus", _R, "focus", doc="Search by task focus"),
        _p("Task", "subject", _R, "for", doc="Search by subject (Task.for)"),
        _p("Task", "patient", _R, "for", doc="Search by patient (Task.for)", targets=("Patient",)),
        _p("Task", "owner", _R, "owner", doc="Search by task owner"),
        _p("Task", "requester", _R, "requester", doc="Search by task requester"),
        _p("Task", "based-on", _R, "basedOn", doc="Search by requests this task is based on"),
        _p("Task", "authored-on", _D, "authoredOn", doc="Search by creation date"),
        _p("Task", "modified", _D, "lastModified", doc="Search by last modification date"),
        _p("Task", "encounter", _R, "encounter", doc="Search by encounter"),
        _p(
            "Task",
            "group-identifier",
            _T,
            "groupIdentifier",
            doc="Search by group identifier",
        ),
        _p("Task", "part-of", _R, "partOf", doc="Search by task this task is part of"),
        _p("Task", "performer", _T, "performerType", doc="Search by recommended type of performer"),
        _p("Task", "period", _D, "executionPeriod", doc="Search by period Task is/was underway"),
    ),
    "ServiceRequest": (
        _p("ServiceRequest", "identifier", _T, "identifier", doc="Identifiers assigned to this order"),
        _p("ServiceRequest", "status", _T, "status", doc="The status of the order"),
        _p("ServiceRequest", "intent", _T, "intent", doc="proposal | plan | order +"),
        _p("ServiceRequest", "priority", _T, "priority", doc="routine | urgent | asap | stat"),
        _p("ServiceRequest", "code", _T, "code", doc="What is being requested/ordered"),
        _p("ServiceRequest", "category", _T, "category", doc="Classification of the service"),
        _p("ServiceRequest", "requisition", _T, "requisition", doc="Composite Request ID"),
        _p("ServiceRequest", "subject", _R, "subject", doc="Search by subject"),
        _p("ServiceRequest", "patient", _R, "subject", doc="Search by patient", targets=("Patient",)),
        _p("ServiceRequest", "authored", _D, "authoredOn", doc="Date request signed"),
        _p("ServiceRequest", "occurrence", _D, "occurrence[x]", doc="When service should occur"),
    ),
    "DiagnosticReport": (
        *_clinical("DiagnosticReport"),
        _p("DiagnosticReport", "result", _R, "result", doc="Link to an atomic result (observation)"),
    ),
    "Observation": (
        *_clinical("Observation"),
        _p("Observation", "part-of", _R, "partOf", doc="Part of referenced event (e.g. ImagingStudy)"),
        _p("Observation", "derived-from", _R, "derivedFrom", doc="Related measurements or studies"),
        _p("Observation", "device", _R, "device", doc="The Device that generated the observation"),
        _p(
            "Observation",
            "value-string",
            _S,
            "valueString",
            "valueCodeableConcept.text",
            doc="The value of the observation, if the value is a string, and text matching",
        ),
    ),
    "Patient": (
        _p("Patient", "identifier", _T, "identifier", doc="A patient identifier"),
        _p(
            "Patient",
            "name",
            _S,
            "name.family",
            "name.given",
            "name.text",
            "name.prefix",
            "name.suffix",
            doc="A portion of the family, given, prefix or suffix name, or the text",
        ),
        _p("Patient", "birthdate", _D, "birthDate", doc="The patient's date of birth"),
        _p("Patient", "gender", _T, "gender", doc="Gender of the patient"),
    ),
    "Device": (_p("Device", "identifier", _T, "identifier", doc="Instance id from manufacturer, owner"),),
    "Provenance": (_p("Provenance", "target", _R, "target", doc="Target Reference(s)"),),
    # R4 AuditEvent-* parameters; `patient` is agent.who and entity.what where they are Patients.
    "AuditEvent": (
        _p("AuditEvent", "date", _D, "recorded", doc="Time when the event was recorded"),
        _p("AuditEvent", "type", _T, "type", doc="Type/identifier of event"),
        _p("AuditEvent", "subtype", _T, "subtype", doc="More specific type/id for the event"),
        _p("AuditEvent", "action", _T, "action", doc="Type of action performed during the event"),
        _p("AuditEvent", "outcome", _T, "outcome", doc="Whether the event succeeded or failed"),
        _p("AuditEvent", "agent", _R, "agent.who", doc="Identifier of who"),
        _p(
            "AuditEvent",
            "patient",
            _R,
            "agent.who",
            "entity.what",
            doc="Identifier of the patient involved (as agent or entity)",
            targets=("Patient",),
        ),
        _p("AuditEvent", "entity", _R, "entity.what", doc="Specific instance of resource"),
        _p("AuditEvent", "source", _R, "source.observer", doc="The identity of source detecting the event"),
        _p("AuditEvent", "address", _S, "agent.network.address", doc="Network access point of an agent"),
    ),
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

#: `_sort` on these (type, parameter) pairs follows the request-priority order instead of the
#: code's text (docs/adr/0004-persistent-store.md, "Sorting"): routine < urgent < asap < stat.
PRIORITY_SORTED_PARAMS = frozenset({("Task", "priority"), ("ServiceRequest", "priority")})
PRIORITY_RANK: dict[str, int] = {"routine": 1, "urgent": 2, "asap": 3, "stat": 4}

_SORTABLE_TYPES = frozenset({SearchParamType.TOKEN, SearchParamType.DATE, SearchParamType.STRING})


def search_param_defs(resource_type: str) -> dict[str, SearchParamDef]:
    """The parser definitions (for `parse_search`) of the parameters searchable for a type: the
    indexed ones plus `_id` and `_lastUpdated` (none for a type without indexes)."""
    if resource_type not in INDEXED_PARAMS:
        return {}
    return {**RESOURCE_PARAMS, **{p.name: p.definition() for p in INDEXED_PARAMS[resource_type]}}


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


def _values_at(node: Any, steps: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _values_at(item, steps)
        return
    if not steps:
        yield node
        return
    if not isinstance(node, dict):
        return
    step, rest = steps[0], steps[1:]
    if step.endswith("[x]"):
        stem = step[:-3]
        for key, value in node.items():
            if key.startswith(stem) and key[len(stem) : len(stem) + 1].isupper():
                yield from _values_at(value, rest)
    elif step in node:
        yield from _values_at(node[step], rest)


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
            for value in _values_at(resource, path.split(".")[1:]):
                if param.type is SearchParamType.TOKEN:
                    rows.tokens.extend((param.name, s, c) for s, c in _tokens(value))
                elif param.type is SearchParamType.DATE:
                    rows.dates.extend((param.name, lo, up) for lo, up in _dates(value))
                elif param.type is SearchParamType.REFERENCE:
                    ref = _reference(value)
                    if ref and (not param.target_types or ref[0] in param.target_types):
                        rows.references.append((param.name, *ref))
                elif param.type is SearchParamType.STRING and isinstance(value, str):
                    rows.strings.append((param.name, normalize_string(value), value))
    return rows
