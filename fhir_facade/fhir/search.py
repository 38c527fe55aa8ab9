"""Search request parsing (FHIR R4 search.html): query string -> a typed `SearchRequest`.

Stores and translators (QIDO-RS, SQL) consume `SearchRequest` and never see raw parameters.
Semantics implemented here, once, for every resource type:

- repeated parameter = AND, comma-separated values = OR (`\\,` escapes a comma);
- date prefixes eq/ne/gt/lt/ge/le, each value a range at its precision (search.html#date);
- token `system|code`, `|code`, `system|`, `code`, and `:of-type=typesystem|typecode|value` on
  identifiers (search.html#token); reference `Type/id`, `id`, absolute URLs,
  `:identifier` and type modifiers; string `:exact`/`:contains`;
- unknown parameters are ignored (and left out of the self link) unless
  `Prefer: handling=strict`, then 400; unsupported modifiers are always 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from fhir_facade.fhir.errors import bad_request
from fhir_facade.fhir.ids import is_fhir_id

__all__ = [
    "RESULT_PARAMETERS",
    "DateValue",
    "IdentifierOfType",
    "IncludeSpec",
    "ReferenceValue",
    "SearchClause",
    "SearchParamDef",
    "SearchParamType",
    "SearchRequest",
    "StringValue",
    "TokenValue",
    "parse_date_value",
    "parse_search",
]


class SearchParamType(StrEnum):
    TOKEN = "token"
    REFERENCE = "reference"
    DATE = "date"
    STRING = "string"
    URI = "uri"
    NUMBER = "number"


@dataclass(frozen=True)
class SearchParamDef:
    """A search parameter a provider supports, as listed in the CapabilityStatement."""

    name: str
    type: SearchParamType
    documentation: str
    definition: str | None = None
    modifiers: frozenset[str] = frozenset()
    target_types: tuple[str, ...] = ()
    date_prefixes: frozenset[str] = frozenset({"eq", "ne", "gt", "lt", "ge", "le"})


@dataclass(frozen=True)
class TokenValue:
    """`system|code`. system None = any system; "" = explicitly no system. code None = any code."""

    system: str | None
    code: str | None


@dataclass(frozen=True)
class IdentifierOfType:
    """`identifier:of-type=[system]|[code]|[value]` (search.html#token): an Identifier whose
    type has a coding (system, code) and whose value is `value`; all three parts are required."""

    type_system: str
    type_code: str
    value: str


@dataclass(frozen=True)
class ReferenceValue:
    """`Type/id`, bare `id`, an absolute URL, or (with `:identifier`) a token."""

    resource_type: str | None = None
    id: str | None = None
    url: str | None = None
    identifier: TokenValue | None = None


@dataclass(frozen=True)
class DateValue:
    """A date search value as the half-open range [lower, upper) at the precision given.

    Bounds are timezone-aware when the value carried an offset (or Z), naive otherwise; a naive
    value means "local time" (search.html#date), which the consumer resolves.
    """

    prefix: str
    lower: datetime
    upper: datetime
    precision: str  # year | month | day | minute | second

    @property
    def has_timezone(self) -> bool:
        return self.lower.tzinfo is not None


@dataclass(frozen=True)
class StringValue:
    value: str


Value = TokenValue | IdentifierOfType | ReferenceValue | DateValue | StringValue


@dataclass(frozen=True)
class SearchClause:
    """One parameter occurrence: its values are ORed; clauses of a request are ANDed."""

    param: SearchParamDef
    modifier: str | None
    values: tuple[Value, ...]
    raw_name: str
    raw_value: str


@dataclass(frozen=True)
class IncludeSpec:
    """`_include=Source:param[:Target]` or `_revinclude=...` (search.html#include)."""

    source_type: str
    param: str
    target_type: str | None = None


@dataclass
class SearchRequest:
    resource_type: str
    clauses: list[SearchClause]
    count: int
    offset: int = 0
    summary: str | None = None
    elements: tuple[str, ...] = ()
    total: str = "accurate"
    sort: tuple[str, ...] = ()
    link_params: list[tuple[str, str]] = field(default_factory=list)
    includes: list[IncludeSpec] = field(default_factory=list)
    revincludes: list[IncludeSpec] = field(default_factory=list)
    #: Paging snapshot (`_snapshot`, set by the server in its paging links): only resources last
    #: updated at or before it match, so rows added while a client pages do not shift the pages.
    snapshot: datetime | None = None

    def clauses_for(self, name: str) -> list[SearchClause]:
        return [c for c in self.clauses if c.param.name == name]


#: Result parameters (search.html#return) this machinery handles for every type.
RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_offset",
        "_summary",
        "_elements",
        "_total",
        "_format",
        "_pretty",
        "_sort",
        "_include",
        "_revinclude",
        "_snapshot",
    }
)
#: PACS and databases take 32-bit offsets; a larger one is a client error, not a PACS failure.
MAX_OFFSET = 2**31 - 1
_SUMMARY_VALUES = frozenset({"true", "false", "count", "text", "data"})
_TOTAL_VALUES = frozenset({"none", "estimate", "accurate"})
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_DATE_RE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def split_unescaped(value: str, separator: str) -> list[str]:
    """Split on `separator` not preceded by a backslash; escapes stay for `_unescape` later
    (search.html#escaping)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            current.append(char + next(chars, ""))
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", value)


def parse_date_value(raw: str, *, name: str, allowed_prefixes: Iterable[str]) -> DateValue:
    """Parse `[prefix]date` into its range. Partial dates cover their whole year/month/day."""
    prefix = "eq"
    if raw[:2] in _PREFIXES and not raw[:2].isdigit():
        prefix, raw = raw[:2], raw[2:]
    if prefix not in allowed_prefixes:
        raise bad_request(f"Prefix '{prefix}' is not supported for '{name}'", expression=name)
    match = _DATE_RE.match(raw)
    if not match:
        raise bad_request(
            f"Invalid date '{raw}' for '{name}': expected YYYY, YYYY-MM, YYYY-MM-DD or "
            "YYYY-MM-DDThh:mm[:ss][Z|+hh:mm]",
            expression=name,
        )
    parts = match.groupdict()
    if parts["hour"] is not None and parts["tz"] is None and parts["second"] is None:
        pass  # minute precision without offset: a local time, allowed
    tz: timezone | None = None
    if parts["tz"] == "Z":
        tz = UTC
    elif parts["tz"]:
        sign = 1 if parts["tz"][0] == "+" else -1
        hours, minutes = int(parts["tz"][1:3]), int(parts["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        year = int(parts["year"])
        if parts["month"] is None:
            lower = datetime(year, 1, 1, tzinfo=tz)
            upper, precision = datetime(year + 1, 1, 1, tzinfo=tz), "year"
        elif parts["day"] is None:
            month = int(parts["month"])
            lower = datetime(year, month, 1, tzinfo=tz)
            upper = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
            precision = "month"
        elif parts["hour"] is None:
            lower = datetime(year, int(parts["month"]), int(parts["day"]), tzinfo=tz)
            upper, precision = lower + timedelta(days=1), "day"
        else:
            second = int(parts["second"] or 0)
            micro = int((parts["fraction"] or "0")[:6].ljust(6, "0"))
            lower = datetime(
                year,
                int(parts["month"]),
                int(parts["day"]),
                int(parts["hour"]),
                int(parts["minute"]),
                second,
                micro,
                tzinfo=tz,
            )
            if parts["second"] is None:
                upper, precision = lower + timedelta(minutes=1), "minute"
            elif parts["fraction"]:
                upper, precision = lower + timedelta(microseconds=1), "second"
            else:
                upper, precision = lower + timedelta(seconds=1), "second"
    except ValueError as exc:
        raise bad_request(f"Invalid date '{raw}' for '{name}': {exc}", expression=name) from exc
    return DateValue(prefix, lower, upper, precision)


def _parse_token(raw: str) -> TokenValue:
    parts = split_unescaped(raw, "|")
    if len(parts) == 1:
        return TokenValue(None, _unescape(parts[0]) or None)
    system, code = _unescape(parts[0]), _unescape("|".join(parts[1:]))
    return TokenValue(system, code or None)


def _parse_of_type(raw: str, name: str) -> IdentifierOfType:
    parts = [_unescape(p) for p in split_unescaped(raw, "|")]
    if len(parts) != 3 or not all(parts):
        raise bad_request(
            f"'{name}:of-type' takes type-system|type-code|value, all three present, got '{raw}'",
            expression=f"{name}:of-type",
        )
    return IdentifierOfType(*parts)


def _parse_reference(raw: str, modifier: str | None, param: SearchParamDef, base_url: str) -> ReferenceValue:
    raw = _unescape(raw)
    if modifier == "identifier":
        return ReferenceValue(identifier=_parse_token(raw))
    type_from_modifier = modifier if modifier and modifier[0].isupper() else None
    if raw.startswith(base_url + "/"):
        raw = raw[len(base_url) + 1 :]
    elif "://" in raw or raw.startswith("urn:"):
        return ReferenceValue(url=raw)
    segments = raw.split("/")
    resource_type: str | None
    if len(segments) == 2:
        resource_type, resource_id = segments
    elif len(segments) == 1:
        resource_type, resource_id = type_from_modifier, segments[0]
    elif len(segments) == 4 and segments[2] == "_history":
        resource_type, resource_id = segments[0], segments[1]
    else:
        raise bad_request(f"Invalid reference '{raw}' for '{param.name}'", expression=param.name)
    if type_from_modifier and resource_type != type_from_modifier:
        raise bad_request(
            f"Reference '{raw}' contradicts the modifier ':{type_from_modifier}'",
            expression=param.name,
        )
    if param.target_types and resource_type and resource_type not in param.target_types:
        raise bad_request(
            f"'{param.name}' refers to {', '.join(param.target_types)}, not {resource_type}",
            expression=param.name,
        )
    if not is_fhir_id(resource_id):
        raise bad_request(f"Invalid resource id '{resource_id}' for '{param.name}'", expression=param.name)
    return ReferenceValue(resource_type=resource_type, id=resource_id)


def _parse_values(param: SearchParamDef, modifier: str | None, raw: str, base_url: str) -> tuple[Value, ...]:
    if raw == "":
        raise bad_request(f"Empty value for '{param.name}'", expression=param.name)
    values: list[Value] = []
    for part in split_unescaped(raw, ","):
        if part == "":
            raise bad_request(f"Empty value in the list for '{param.name}'", expression=param.name)
        if param.type is SearchParamType.DATE:
            values.append(parse_date_value(part, name=param.name, allowed_prefixes=param.date_prefixes))
        elif param.type is SearchParamType.TOKEN and modifier == "of-type":
            values.append(_parse_of_type(part, param.name))
        elif param.type is SearchParamType.TOKEN:
            values.append(_parse_token(part))
        elif param.type is SearchParamType.REFERENCE:
            values.append(_parse_reference(part, modifier, param, base_url))
        else:
            values.append(StringValue(_unescape(part)))
    return tuple(values)


def _non_negative_int(name: str, raw: str) -> int:
    # ASCII digits only ('²'.isdigit() is true, int('²') fails), and few enough of them that int()
    # is cheap and the value fits any SQL integer.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise bad_request(
            f"'{name}' must be a non-negative integer below 10^18, got '{raw[:40]}'", expression=name
        )
    return int(raw)


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    definitions: Mapping[str, SearchParamDef],
    *,
    base_url: str,
    strict: bool,
    default_count: int,
    max_count: int,
    sortable: frozenset[str] = frozenset(),
) -> SearchRequest:
    """Parse query parameters for `resource_type` against the parameters it supports."""
    request = SearchRequest(resource_type, [], count=min(default_count, max_count))
    for raw_name, raw_value in params:
        name, _, modifier_text = raw_name.partition(":")
        modifier = modifier_text or None
        if name == "_sort" and not _sort_supported(raw_value, sortable):
            if strict:
                raise bad_request(
                    f"_sort={raw_value} is not supported for {resource_type}; sortable: "
                    f"{', '.join(sorted(sortable)) or 'none'}",
                    expression="_sort",
                    code="not-supported",
                )
            continue
        if name in RESULT_PARAMETERS:
            _apply_result_parameter(request, name, raw_value, max_count)
            if name not in ("_offset", "_snapshot"):
                request.link_params.append((raw_name, raw_value))
            continue
        param = definitions.get(name)
        if param is None:
            if strict:
                raise bad_request(
                    f"Unknown search parameter '{name}' for {resource_type} (Prefer: handling=strict)",
                    expression=name,
                    code="not-supported",
                )
            continue
        if modifier is not None and modifier not in param.modifiers:
            raise bad_request(
                f"Modifier ':{modifier}' is not supported for '{name}'",
                expression=raw_name,
                code="not-supported",
            )
        values = _parse_values(param, modifier, raw_value, base_url)
        request.clauses.append(SearchClause(param, modifier, values, raw_name, raw_value))
        request.link_params.append((raw_name, raw_value))
    return request


def _sort_supported(raw: str, sortable: frozenset[str]) -> bool:
    keys = [k.lstrip("-") for k in raw.split(",") if k]
    return bool(keys) and all(k in sortable for k in keys)


def _apply_result_parameter(request: SearchRequest, name: str, raw: str, max_count: int) -> None:
    if name == "_snapshot":
        try:
            moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError as exc:
            raise bad_request(
                "_snapshot is an instant set by the server's paging links", expression=name
            ) from exc
        request.snapshot = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    elif name in ("_include", "_revinclude"):
        parts = raw.split(":")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[A-Za-z][A-Za-z0-9\-]*", p) for p in parts):
            raise bad_request(f"{name} takes Type:parameter[:TargetType], got '{raw}'", expression=name)
        spec = IncludeSpec(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
        (request.includes if name == "_include" else request.revincludes).append(spec)
    elif name == "_count":
        request.count = min(_non_negative_int(name, raw), max_count)
    elif name == "_offset":
        request.offset = _non_negative_int(name, raw)
        if request.offset > MAX_OFFSET:
            raise bad_request(f"_offset must be at most {MAX_OFFSET}", expression=name)
    elif name == "_summary":
        if raw not in _SUMMARY_VALUES:
            raise bad_request(f"_summary must be one of {sorted(_SUMMARY_VALUES)}", expression=name)
        request.summary = raw
    elif name == "_total":
        if raw not in _TOTAL_VALUES:
            raise bad_request(f"_total must be one of {sorted(_TOTAL_VALUES)}", expression=name)
        request.total = raw
    elif name == "_elements":
        elements = tuple(e.strip() for e in raw.split(",") if e.strip())
        if not all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", e) for e in elements):
            raise bad_request("_elements takes a comma-separated list of element names", expression=name)
        request.elements = elements
    elif name == "_sort":
        request.sort = tuple(s for s in raw.split(",") if s)


def search_values(clauses: Iterable[SearchClause]) -> list[Any]:
    """All values of the given clauses, flattened (for parameters whose AND/OR collapse)."""
    return [v for clause in clauses for v in clause.values]
