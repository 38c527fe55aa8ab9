"""`_id`, `_lastUpdated` and `_sort` (R4 search.html#all, #sort) on SQLite and PostgreSQL, and the
R4 Task / ServiceRequest parameters the worklist needs."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.search import SearchRequest
from fhir_facade.resources.stored import StoredResourceProvider
from fhir_facade.store import ResourceStore, search_param_defs, sortable_params
from tests.store.conftest import EPOCH, search_request, valid

TASK_R4_PARAMS = {
    "authored-on",
    "based-on",
    "business-status",
    "code",
    "encounter",
    "focus",
    "group-identifier",
    "identifier",
    "intent",
    "modified",
    "owner",
    "part-of",
    "patient",
    "performer",
    "period",
    "priority",
    "requester",
    "status",
    "subject",
}
SERVICE_REQUEST_PARAMS = {
    "identifier",
    "patient",
    "subject",
    "status",
    "intent",
    "code",
    "category",
    "authored",
    "occurrence",
    "requisition",
    "priority",
}


def task(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": "requested", "intent": "order", **extra}


def put(store: ResourceStore, resource: dict[str, Any]) -> str:
    return str(store.update(resource).resource["id"])


def ordered(store: ResourceStore, resource_type: str, *query: tuple[str, str]) -> list[str]:
    matches, total = store.search(search_request(resource_type, list(query)))
    assert total == len(matches)
    for match in matches:
        valid(match)
    return [m["id"] for m in matches]


def ids(store: ResourceStore, resource_type: str, *query: tuple[str, str]) -> set[str]:
    return set(ordered(store, resource_type, *query))


# -- _id and _lastUpdated ------------------------------------------------------------------------


def test_id_or_and_combined(store: ResourceStore) -> None:
    for name in ("a", "b", "c"):
        put(store, task(id=name, status="accepted" if name == "c" else "requested"))
    assert ids(store, "Task", ("_id", "a")) == {"a"}
    assert ids(store, "Task", ("_id", "a,c")) == {"a", "c"}
    assert ids(store, "Task", ("_id", "a,zz")) == {"a"}
    assert ids(store, "Task", ("_id", "zz")) == set()
    assert ids(store, "Task", ("_id", "a,c"), ("status", "requested")) == {"a"}
    assert ids(store, "Task", ("_id", "a,b"), ("_id", "b,c")) == {"b"}


def test_id_is_per_type_and_skips_deleted(store: ResourceStore) -> None:
    put(store, task(id="x"))
    put(store, {"resourceType": "Observation", "id": "y", "status": "final", "code": {"text": "t"}})
    put(store, task(id="gone"))
    store.delete("Task", "gone")
    assert ids(store, "Task", ("_id", "x,y,gone")) == {"x"}


def test_id_rejects_a_system(store: ResourceStore) -> None:
    with pytest.raises(FhirError) as info:
        store.search(search_request("Task", [("_id", "http://s|x")]))
    assert info.value.status == 400


@pytest.fixture
def timed(store: ResourceStore) -> ResourceStore:
    # The ticking clock: a at 12:00:01, b at 12:00:02, c at 12:00:03 (UTC).
    for name in ("a", "b", "c"):
        put(store, task(id=name))
    return store


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-03-01T12:00:02Z", {"b"}),
        ("eq2025-03-01T12:00:02Z", {"b"}),
        ("ne2025-03-01T12:00:02Z", {"a", "c"}),
        ("gt2025-03-01T12:00:02Z", {"c"}),
        ("ge2025-03-01T12:00:02Z", {"b", "c"}),
        ("lt2025-03-01T12:00:02Z", {"a"}),
        ("le2025-03-01T12:00:02Z", {"a", "b"}),
        ("2025-03-01", {"a", "b", "c"}),
        ("2025-03", {"a", "b", "c"}),
        ("gt2025-03-01", set()),
        ("lt2025-03-01", set()),
        ("ge2025-03-01T12:00", {"a", "b", "c"}),  # minute precision, no offset: UTC
        ("2025-03-01T13:00:02+01:00", {"b"}),
        ("lt2025-03-01T12:00:02Z,gt2025-03-01T12:00:02Z", {"a", "c"}),  # OR
    ],
)
def test_last_updated_prefixes(timed: ResourceStore, value: str, expected: set[str]) -> None:
    assert ids(timed, "Task", ("_lastUpdated", value)) == expected


def test_last_updated_and_and_moves_with_updates(timed: ResourceStore) -> None:
    both = (("_lastUpdated", "gt2025-03-01T12:00:01Z"), ("_lastUpdated", "lt2025-03-01T12:00:03Z"))
    assert ids(timed, "Task", *both) == {"b"}
    put(timed, task(id="a", status="accepted"))  # now at 12:00:04
    assert ids(timed, "Task", ("_lastUpdated", "gt2025-03-01T12:00:03Z")) == {"a"}


# -- _sort ---------------------------------------------------------------------------------------


@pytest.fixture
def worklist(store: ResourceStore) -> ResourceStore:
    put(store, task(id="r1", priority="routine", authoredOn="2025-01-03"))
    put(store, task(id="s1", priority="stat", authoredOn="2025-01-05T08:00:00Z"))
    put(store, task(id="u1", priority="urgent", authoredOn="2025-01-01"))
    put(store, task(id="none", authoredOn="2025-01-02"))
    put(store, task(id="a1", priority="asap"))
    put(store, task(id="s2", priority="stat", authoredOn="2025-01-04"))
    return store


def test_sort_priority_in_request_priority_order(worklist: ResourceStore) -> None:
    # The ties (s1, s2) fall back to lastUpdated descending: s2 was written last.
    assert ordered(worklist, "Task", ("_sort", "-priority")) == ["s2", "s1", "a1", "u1", "r1", "none"]
    assert ordered(worklist, "Task", ("_sort", "priority")) == ["r1", "u1", "a1", "s2", "s1", "none"]


def test_sort_service_request_priority(store: ResourceStore) -> None:
    order = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"display": "x"},
    }
    for name, priority in (("r", "routine"), ("s", "stat"), ("u", "urgent"), ("a", "asap")):
        put(store, {**order, "id": name, "priority": priority})
    put(store, {**order, "id": "none"})
    assert ordered(store, "ServiceRequest", ("_sort", "-priority")) == ["s", "a", "u", "r", "none"]
    assert ordered(store, "ServiceRequest", ("_sort", "priority")) == ["r", "u", "a", "s", "none"]
    assert ids(store, "ServiceRequest", ("priority", "stat,asap")) == {"s", "a"}


def test_sort_authored_on(worklist: ResourceStore) -> None:
    assert ordered(worklist, "Task", ("_sort", "authored-on")) == ["u1", "none", "r1", "s2", "s1", "a1"]
    assert ordered(worklist, "Task", ("_sort", "-authored-on")) == ["s1", "s2", "r1", "none", "u1", "a1"]


def test_sort_date_uses_lower_bound_ascending_upper_bound_descending(store: ResourceStore) -> None:
    put(store, task(id="day", authoredOn="2025-01-10"))  # [01-10T00:00, 01-11T00:00)
    put(store, task(id="noon", authoredOn="2025-01-10T12:00:00Z"))
    assert ordered(store, "Task", ("_sort", "authored-on")) == ["day", "noon"]
    assert ordered(store, "Task", ("_sort", "-authored-on")) == ["day", "noon"]


def test_sort_multiple_keys(worklist: ResourceStore) -> None:
    assert ordered(worklist, "Task", ("_sort", "priority,authored-on")) == [
        "r1",
        "u1",
        "a1",
        "s2",
        "s1",
        "none",
    ]
    assert ordered(worklist, "Task", ("_sort", "-priority,-authored-on")) == [
        "s1",
        "s2",
        "a1",
        "u1",
        "r1",
        "none",
    ]


def test_sort_last_updated_and_id(worklist: ResourceStore) -> None:
    written = ["r1", "s1", "u1", "none", "a1", "s2"]
    assert ordered(worklist, "Task", ("_sort", "-_lastUpdated")) == list(reversed(written))
    assert ordered(worklist, "Task", ("_sort", "_lastUpdated")) == written
    assert ordered(worklist, "Task", ("_sort", "_id")) == sorted(written)
    assert ordered(worklist, "Task", ("_sort", "-_id")) == sorted(written, reverse=True)


def test_sort_token_by_code_and_string(store: ResourceStore) -> None:
    put(store, task(id="t1", status="requested"))
    put(store, task(id="t2", status="accepted"))
    put(store, task(id="t3", status="completed"))
    assert ordered(store, "Task", ("_sort", "status")) == ["t2", "t3", "t1"]
    assert ordered(store, "Task", ("_sort", "-status")) == ["t1", "t3", "t2"]
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    put(store, {**observation, "id": "o1", "valueString": "Émbolie"})
    put(store, {**observation, "id": "o2", "valueString": "abcès"})
    put(store, {**observation, "id": "o3"})
    put(store, {**observation, "id": "o4", "valueString": "fracture"})
    assert ordered(store, "Observation", ("_sort", "value-string")) == ["o2", "o1", "o4", "o3"]
    assert ordered(store, "Observation", ("_sort", "-value-string")) == ["o4", "o1", "o2", "o3"]


def test_sort_with_filter_and_paging(worklist: ResourceStore) -> None:
    query = [("_sort", "-priority"), ("authored-on", "ge2025-01-02")]
    assert ordered(worklist, "Task", *query) == ["s2", "s1", "r1", "none"]
    pages: list[str] = []
    for offset in (0, 3):
        matches, total = worklist.search(
            search_request("Task", [*query, ("_count", "3"), ("_offset", str(offset))])
        )
        assert total == 4
        pages.extend(m["id"] for m in matches)
    assert pages == ["s2", "s1", "r1", "none"]


def test_paging_with_ties_is_stable(store: ResourceStore) -> None:
    """All values and all lastUpdated equal: the id tiebreaker decides, on every page."""
    frozen = ResourceStore(store.engine, clock=lambda: EPOCH)
    names = ["m", "c", "x", "a", "k", "f", "q"]
    for name in names:
        put(frozen, task(id=name, priority="routine"))
    for key in ("priority", "-priority", "-_lastUpdated", "status"):
        pages: list[str] = []
        for offset in range(0, len(names), 3):
            matches, total = frozen.search(
                search_request("Task", [("_sort", key), ("_count", "3"), ("_offset", str(offset))])
            )
            assert total == len(names)
            pages.extend(m["id"] for m in matches)
        assert pages == sorted(names), key


def test_paging_with_partial_ties(worklist: ResourceStore) -> None:
    everything = ordered(worklist, "Task", ("_sort", "-priority"))
    pages: list[str] = []
    for offset in range(0, 6, 2):
        request = search_request("Task", [("_sort", "-priority"), ("_count", "2"), ("_offset", str(offset))])
        pages.extend(m["id"] for m in worklist.search(request)[0])
    assert pages == everything


def test_sortable_contents(store: ResourceStore) -> None:
    task_sortable = sortable_params("Task")
    assert {"_id", "_lastUpdated", "priority", "authored-on", "status", "modified", "period"} <= task_sortable
    assert {"patient", "owner", "focus", "subject", "based-on"}.isdisjoint(task_sortable)
    assert store.sortable("Task") == task_sortable
    assert {"authored", "occurrence", "status", "_lastUpdated"} <= sortable_params("ServiceRequest")
    assert "value-string" in sortable_params("Observation")
    assert sortable_params("Device") == {"_id", "_lastUpdated", "identifier"}
    assert StoredResourceProvider("Task", store).sortable == task_sortable


def test_unsupported_sort_keys(store: ResourceStore) -> None:
    with pytest.raises(FhirError) as info:
        search_request("Task", [("_sort", "patient")])
    assert (info.value.status, info.value.issues[0].code) == (400, "not-supported")
    assert search_request("Task", [("_sort", "-owner")], strict=False).sort == ()
    assert search_request("Task", [("_sort", "-priority,_id")]).sort == ("-priority", "_id")
    with pytest.raises(FhirError) as info:  # the store checks too
        store.search(SearchRequest("Task", [], count=10, sort=("patient",)))
    assert info.value.status == 400


# -- R4 parameters ---------------------------------------------------------------------------------


def test_every_r4_task_and_service_request_parameter_is_searchable() -> None:
    assert TASK_R4_PARAMS | {"_id", "_lastUpdated"} <= set(search_param_defs("Task"))
    assert SERVICE_REQUEST_PARAMS | {"_id", "_lastUpdated"} <= set(search_param_defs("ServiceRequest"))
    definitions = search_param_defs("Task")
    assert definitions["_id"].definition == "http://hl7.org/fhir/SearchParameter/Resource-id"
    assert (
        definitions["_lastUpdated"].definition == "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"
    )
    assert set(search_param_defs("Device")) == {"_id", "_lastUpdated", "identifier"}


def test_new_task_parameters(store: ResourceStore) -> None:
    put(
        store,
        task(
            id="full",
            performerType=[{"coding": [{"system": "http://snomed.info/sct", "code": "159141008"}]}],
            executionPeriod={"start": "2025-02-01T08:00:00Z", "end": "2025-02-01T09:00:00Z"},
            groupIdentifier={"system": "urn:grp", "value": "G-1"},
            partOf=[{"reference": "Task/parent"}],
            encounter={"reference": "Encounter/e1"},
            lastModified="2025-02-01T09:30:00Z",
        ),
    )
    put(store, task(id="bare"))
    assert ids(store, "Task", ("performer", "http://snomed.info/sct|159141008")) == {"full"}
    assert ids(store, "Task", ("period", "2025-02-01")) == {"full"}
    assert ids(store, "Task", ("period", "gt2025-02-01T08:30:00Z")) == {"full"}
    assert ids(store, "Task", ("group-identifier", "urn:grp|G-1")) == {"full"}
    assert ids(store, "Task", ("part-of", "Task/parent")) == {"full"}
    assert ids(store, "Task", ("encounter", "e1")) == {"full"}
    assert ids(store, "Task", ("modified", "2025-02-01")) == {"full"}
    assert ordered(store, "Task", ("_sort", "-period")) == ["full", "bare"]
