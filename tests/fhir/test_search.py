"""Search-parameter parsing (FHIR R4 search.html), independent of any data source."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.search import (
    DateValue,
    ReferenceValue,
    SearchParamDef,
    SearchParamType,
    StringValue,
    TokenValue,
    parse_date_value,
    parse_search,
)

BASE = "http://example.org/fhir"
DEFS = {
    "started": SearchParamDef("started", SearchParamType.DATE, ""),
    "identifier": SearchParamDef("identifier", SearchParamType.TOKEN, ""),
    "patient": SearchParamDef(
        "patient",
        SearchParamType.REFERENCE,
        "",
        modifiers=frozenset({"identifier"}),
        target_types=("Patient",),
    ),
    "name": SearchParamDef("name", SearchParamType.STRING, "", modifiers=frozenset({"exact"})),
}
ALL_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le"})


def parse(query: list[tuple[str, str]], strict: bool = False, **kw: object):
    return parse_search(
        "ImagingStudy",
        query,
        DEFS,
        base_url=BASE,
        strict=strict,
        default_count=20,
        max_count=100,
        **kw,
    )


def error_of(call) -> FhirError:
    with pytest.raises(FhirError) as info:
        call()
    return info.value


@pytest.mark.parametrize(
    ("raw", "lower", "upper", "precision"),
    [
        ("2020", datetime(2020, 1, 1), datetime(2021, 1, 1), "year"),
        ("2020-12", datetime(2020, 12, 1), datetime(2021, 1, 1), "month"),
        ("2020-02", datetime(2020, 2, 1), datetime(2020, 3, 1), "month"),
        ("2020-02-29", datetime(2020, 2, 29), datetime(2020, 3, 1), "day"),
        (
            "2020-02-29T10:30",
            datetime(2020, 2, 29, 10, 30),
            datetime(2020, 2, 29, 10, 31),
            "minute",
        ),
        (
            "2020-02-29T10:30:05",
            datetime(2020, 2, 29, 10, 30, 5),
            datetime(2020, 2, 29, 10, 30, 6),
            "second",
        ),
    ],
)
def test_partial_dates_are_ranges(raw: str, lower: datetime, upper: datetime, precision: str) -> None:
    value = parse_date_value(raw, name="started", allowed_prefixes=ALL_PREFIXES)
    assert (value.lower, value.upper, value.precision, value.prefix) == (
        lower,
        upper,
        precision,
        "eq",
    )
    assert not value.has_timezone


@pytest.mark.parametrize("prefix", ["eq", "ne", "gt", "lt", "ge", "le"])
def test_date_prefixes(prefix: str) -> None:
    value = parse_date_value(f"{prefix}2021-03-04", name="started", allowed_prefixes=ALL_PREFIXES)
    assert value.prefix == prefix and value.lower == datetime(2021, 3, 4)


def test_date_with_offset_is_aware() -> None:
    value = parse_date_value("ge2021-03-04T10:00:00+05:30", name="started", allowed_prefixes=ALL_PREFIXES)
    assert value.lower == datetime(2021, 3, 4, 10, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert parse_date_value("2021-03-04T10:00:00Z", name="s", allowed_prefixes=ALL_PREFIXES).has_timezone


@pytest.mark.parametrize(
    "raw", ["2020-13", "2020-02-30", "20200101", "yesterday", "2020-01-01T25:00", "sa2020"]
)
def test_bad_dates_are_400_naming_the_parameter(raw: str) -> None:
    error = error_of(lambda: parse([("started", raw)]))
    assert error.status == 400
    assert error.issues[0].expression == ("started",)


def test_tokens() -> None:
    request = parse([("identifier", "sys|abc,|def,ghi,sys|,a\\|b")])
    assert request.clauses[0].values == (
        TokenValue("sys", "abc"),
        TokenValue("", "def"),
        TokenValue(None, "ghi"),
        TokenValue("sys", None),
        TokenValue(None, "a|b"),
    )


def test_escaped_comma_is_not_a_separator() -> None:
    request = parse([("name", "Doe\\,John")])
    assert request.clauses[0].values == (StringValue("Doe,John"),)


def test_references() -> None:
    request = parse([("patient", "Patient/p1,p2," + BASE + "/Patient/p3")])
    assert request.clauses[0].values == (
        ReferenceValue("Patient", "p1"),
        ReferenceValue(None, "p2"),
        ReferenceValue("Patient", "p3"),
    )
    by_identifier = parse([("patient:identifier", "urn:mrn|123")])
    assert by_identifier.clauses[0].values == (ReferenceValue(identifier=TokenValue("urn:mrn", "123")),)


def test_reference_to_wrong_type_is_400() -> None:
    assert error_of(lambda: parse([("patient", "Device/1")])).status == 400


def test_repeated_parameter_is_and_comma_is_or() -> None:
    request = parse([("started", "ge2020"), ("started", "lt2021,gt2022")])
    assert len(request.clauses) == 2
    assert [len(c.values) for c in request.clauses] == [1, 2]
    assert all(isinstance(v, DateValue) for c in request.clauses for v in c.values)


def test_unsupported_modifier_is_always_400() -> None:
    error = error_of(lambda: parse([("identifier:text", "x")]))
    assert error.status == 400 and error.issues[0].code == "not-supported"


def test_unknown_parameters_lenient_and_strict() -> None:
    request = parse([("foo", "bar"), ("identifier", "x")])
    assert [c.param.name for c in request.clauses] == ["identifier"]
    assert ("foo", "bar") not in request.link_params
    error = error_of(lambda: parse([("foo", "bar")], strict=True))
    assert error.status == 400 and error.issues[0].expression == ("foo",)


def test_count_is_capped_and_validated() -> None:
    assert parse([("_count", "1000")]).count == 100
    assert parse([("_count", "0")]).count == 0
    assert parse([]).count == 20
    assert error_of(lambda: parse([("_count", "-1")])).status == 400
    assert error_of(lambda: parse([("_count", "ten")])).status == 400
    assert error_of(lambda: parse([("_offset", str(2**31))])).status == 400


def test_summary_and_elements() -> None:
    request = parse([("_summary", "count"), ("_elements", "identifier,status")])
    assert request.summary == "count" and request.elements == ("identifier", "status")
    assert error_of(lambda: parse([("_summary", "maybe")])).status == 400


def test_unsupported_sort_ignored_or_rejected() -> None:
    assert parse([("_sort", "started")]).sort == ()
    assert parse([("_sort", "-started")], sortable=frozenset({"started"})).sort == ("-started",)
    assert error_of(lambda: parse([("_sort", "started")], strict=True)).status == 400


def test_empty_value_is_400() -> None:
    assert error_of(lambda: parse([("identifier", "")])).status == 400
