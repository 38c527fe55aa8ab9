"""`ResourceStore.search` (R4 search.html) on SQLite and PostgreSQL: every parameter type, date
prefixes with range semantics, OR/AND, paging and totals."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_facade.fhir.errors import FhirError
from fhir_facade.store import ResourceStore
from tests.store.conftest import search_request, valid


def task(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": "requested", "intent": "order", **extra}


def ids(store: ResourceStore, resource_type: str, *query: tuple[str, str]) -> set[str]:
    matches, total = store.search(search_request(resource_type, list(query)))
    assert total == len(matches)
    for match in matches:
        valid(match)
    return {m["id"] for m in matches}


def put(store: ResourceStore, resource: dict[str, Any]) -> str:
    return str(store.update(resource).resource["id"])


@pytest.fixture
def dated(store: ResourceStore) -> ResourceStore:
    put(store, task(id="day", authoredOn="2025-01-10"))
    put(store, task(id="second", authoredOn="2025-01-15T10:00:00Z"))
    put(store, task(id="offset", authoredOn="2025-01-20T23:30:00-05:00"))  # 2025-01-21T04:30Z
    put(store, task(id="undated"))
    return store


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-01-15", {"second"}),
        ("eq2025-01", {"day", "second", "offset"}),
        ("2025", {"day", "second", "offset"}),
        ("ne2025-01-15", {"day", "offset"}),
        ("gt2025-01-15", {"offset"}),
        ("ge2025-01-15", {"second", "offset"}),
        ("lt2025-01-15", {"day"}),
        ("le2025-01-15", {"day", "second"}),
        ("eq2025-01-10T12:00Z", set()),  # the day-precision value is wider than the minute
        ("gt2025-01-10T12:00Z", {"day", "second", "offset"}),
        ("lt2025-01-10T12:00Z", {"day"}),
        ("2025-01-21", {"offset"}),  # compared in UTC
        ("2025-01-20T23:30-05:00", {"offset"}),
        ("2025-01-15T10:00", {"second"}),  # no offset: UTC
        ("2025-01-15T10:00:00+01:00", set()),
    ],
)
def test_date_prefixes(dated: ResourceStore, value: str, expected: set[str]) -> None:
    assert ids(dated, "Task", ("authored-on", value)) == expected


def test_date_period_and_choice_element(store: ResourceStore) -> None:
    order = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"display": "x"},
    }
    put(store, {**order, "id": "closed", "occurrencePeriod": {"start": "2025-02-01", "end": "2025-02-03"}})
    put(store, {**order, "id": "open", "occurrencePeriod": {"start": "2025-02-01T08:00:00Z"}})
    put(store, {**order, "id": "at", "occurrenceDateTime": "2025-02-02T09:00:00Z"})
    assert ids(store, "ServiceRequest", ("occurrence", "2025-02")) == {"closed", "at"}
    assert ids(store, "ServiceRequest", ("occurrence", "2025-02-02")) == {"at"}
    assert ids(store, "ServiceRequest", ("occurrence", "gt2025-02-02")) == {"closed", "open"}
    assert ids(store, "ServiceRequest", ("occurrence", "lt2025-02-02")) == {"closed", "open"}
    assert ids(store, "ServiceRequest", ("occurrence", "ge2030-01-01")) == {"open"}
    assert ids(store, "ServiceRequest", ("occurrence", "ne2025-02")) == {"open"}


def test_date_or_and(dated: ResourceStore) -> None:
    assert ids(dated, "Task", ("authored-on", "2025-01-10,2025-01-21")) == {"day", "offset"}
    assert ids(dated, "Task", ("authored-on", "ge2025-01-11"), ("authored-on", "lt2025-01-16")) == {"second"}


@pytest.fixture
def coded(store: ResourceStore) -> ResourceStore:
    put(store, task(id="s1", code={"coding": [{"system": "http://s1", "code": "c1"}]}, priority="urgent"))
    put(store, task(id="s2", status="accepted", code={"coding": [{"system": "http://s2", "code": "c1"}]}))
    put(store, task(id="nosys", status="completed", code={"coding": [{"code": "c1"}, {"code": "c2"}]}))
    put(store, task(id="ident", identifier=[{"system": "urn:acc", "value": "A-1"}]))
    return store


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (("code", "c1"), {"s1", "s2", "nosys"}),
        (("code", "http://s1|c1"), {"s1"}),
        (("code", "|c1"), {"nosys"}),
        (("code", "http://s2|"), {"s2"}),
        (("code", "C1"), set()),
        (("code", "c2"), {"nosys"}),
        (("status", "accepted,completed"), {"s2", "nosys"}),
        (("priority", "urgent"), {"s1"}),
        (("identifier", "urn:acc|A-1"), {"ident"}),
        (("identifier", "A-1"), {"ident"}),
        (("identifier", "urn:other|A-1"), set()),
    ],
)
def test_token(coded: ResourceStore, query: tuple[str, str], expected: set[str]) -> None:
    assert ids(coded, "Task", query) == expected


def test_token_and_across_parameters(coded: ResourceStore) -> None:
    assert ids(coded, "Task", ("code", "c1"), ("status", "requested")) == {"s1"}
    assert ids(coded, "Task", ("code", "c1"), ("code", "c2")) == {"nosys"}


def test_reference(store: ResourceStore) -> None:
    put(store, task(id="p1", **{"for": {"reference": "Patient/p1"}}, focus={"reference": "ImagingStudy/st1"}))
    put(store, task(id="p2", **{"for": {"reference": "Patient/p2/_history/3"}}))
    put(store, task(id="g1", **{"for": {"reference": "Group/g1"}}))
    put(store, task(id="abs", focus={"reference": "http://pacs.example/fhir/ImagingStudy/st1"}))
    assert ids(store, "Task", ("patient", "p1")) == {"p1"}
    assert ids(store, "Task", ("patient", "Patient/p2")) == {"p2"}
    assert ids(store, "Task", ("patient", "p1,p2")) == {"p1", "p2"}
    assert ids(store, "Task", ("patient", "g1")) == set()  # subject is a Group, not a Patient
    assert ids(store, "Task", ("subject", "Group/g1")) == {"g1"}
    assert ids(store, "Task", ("patient:Patient", "p1")) == {"p1"}
    assert ids(store, "Task", ("focus", "ImagingStudy/st1")) == {"p1"}
    assert ids(store, "Task", ("focus", "http://pacs.example/fhir/ImagingStudy/st1")) == {"abs"}
    assert ids(store, "Task", ("focus", "http://example.org/fhir/ImagingStudy/st1")) == {"p1"}  # our base


def test_string_starts_with_case_and_accent_insensitive(store: ResourceStore) -> None:
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "finding"}}
    put(store, {**observation, "id": "fr", "valueString": "Hématome sous-dural"})
    put(store, {**observation, "id": "cc", "valueCodeableConcept": {"text": "Hematoma, small"}})
    put(store, {**observation, "id": "pct", "valueString": "100%_sure"})
    assert ids(store, "Observation", ("value-string", "hema")) == {"fr", "cc"}
    assert ids(store, "Observation", ("value-string", "HÉMATOME")) == {"fr"}
    assert ids(store, "Observation", ("value-string", "sous")) == set()
    assert ids(store, "Observation", ("value-string:contains", "SOUS")) == {"fr"}
    assert ids(store, "Observation", ("value-string:exact", "Hématome sous-dural")) == {"fr"}
    assert ids(store, "Observation", ("value-string:exact", "hématome sous-dural")) == set()
    assert ids(store, "Observation", ("value-string", "100%")) == {"pct"}
    assert ids(store, "Observation", ("value-string", "1_0")) == set()  # LIKE wildcards are escaped


def test_paging_total_and_stable_order(store: ResourceStore) -> None:
    written = [put(store, task(id=f"t{n}")) for n in range(5)]
    newest_first = list(reversed(written))
    pages: list[str] = []
    for offset in (0, 2, 4):
        matches, total = store.search(search_request("Task", [("_count", "2"), ("_offset", str(offset))]))
        assert total == 5
        pages.extend(m["id"] for m in matches)
    assert pages == newest_first
    matches, total = store.search(search_request("Task", [("_summary", "count")]))
    assert (matches, total) == ([], 5)
    matches, total = store.search(search_request("Task", [("_offset", "10")]))
    assert (matches, total) == ([], 5)


def test_search_sees_only_current_non_deleted_versions(store: ResourceStore) -> None:
    put(store, task(id="moved", status="requested"))
    put(store, task(id="gone", status="requested"))
    put(store, task(id="moved", status="accepted"))
    store.delete("Task", "gone")
    assert ids(store, "Task", ("status", "requested")) == set()
    assert ids(store, "Task", ("status", "accepted")) == {"moved"}
    assert ids(store, "Task") == {"moved"}
    put(store, task(id="gone", status="requested"))  # resurrected: indexed again
    assert ids(store, "Task", ("status", "requested")) == {"gone"}


def test_search_is_per_type(store: ResourceStore) -> None:
    put(store, task(id="same"))
    put(store, {"resourceType": "Observation", "id": "same", "status": "final", "code": {"text": "x"}})
    assert ids(store, "Task", ("status", "final")) == set()
    assert ids(store, "Observation", ("status", "final")) == {"same"}
    assert store.read("Task", "same")["resourceType"] == "Task"


def test_clinical_parameters(store: ResourceStore) -> None:
    report = {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "status": "preliminary",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "subject": {"reference": "Patient/p1"},
        "basedOn": [{"reference": "ServiceRequest/sr1"}],
        "effectiveDateTime": "2025-03-01T10:00:00Z",
    }
    put(store, report)
    query = [
        ("status", "preliminary"),
        ("code", "http://loinc.org|18748-4"),
        ("category", "RAD"),
        ("patient", "p1"),
        ("based-on", "ServiceRequest/sr1"),
        ("date", "2025-03-01"),
    ]
    assert ids(store, "DiagnosticReport", *query) == {"r1"}


def test_unsupported_parameter_is_rejected(store: ResourceStore) -> None:
    with pytest.raises(FhirError) as info:
        search_request("Task", [("not-a-parameter", "x")])
    assert (info.value.status, info.value.issues[0].code) == (400, "not-supported")
