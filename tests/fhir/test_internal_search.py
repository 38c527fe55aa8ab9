"""fhir/internal_search.py: values are escaped once, the request is validated strictly."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import FhirError, gone, not_found
from fhir_facade.fhir.internal_search import SearchBuilder, escape_value, read_or_none
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchParamDef, SearchParamType, SearchRequest, StringValue, TokenValue


class _Tasks(ResourceProvider):
    resource_type = "Task"
    search_params = (
        SearchParamDef("identifier", SearchParamType.TOKEN, "Identifier"),
        SearchParamDef("status", SearchParamType.TOKEN, "Status"),
        SearchParamDef("description", SearchParamType.STRING, "Text"),
    )
    sortable = frozenset({"_lastUpdated"})

    def __init__(self, resources: dict[str, Any] | None = None, error: FhirError | None = None) -> None:
        self.resources = resources or {}
        self.error = error
        self.seen: list[SearchRequest] = []

    async def read(self, resource_id: str) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        if resource_id not in self.resources:
            raise not_found(f"Task/{resource_id}")
        return dict(self.resources[resource_id])

    async def search(self, request: SearchRequest) -> SearchResult:
        self.seen.append(request)
        return SearchResult(list(self.resources.values())[: request.count], len(self.resources), False)


def test_escape_value() -> None:
    assert escape_value(r"a,b|c$d\e") == r"a\,b\|c\$d\\e"


def test_values_arrive_literally() -> None:
    request = (
        SearchBuilder(_Tasks())
        .where_token("identifier", "urn:sys|x", "a,b")
        .where_any("status", ("ready", "in-progress"))
        .where("description", "x,y")
        .sort("-_lastUpdated")
        .count(3)
        .request()
    )
    identifier, status, description = request.clauses
    assert identifier.values == (TokenValue("urn:sys|x", "a,b"),)
    assert status.values == (TokenValue(None, "ready"), TokenValue(None, "in-progress"))
    assert [v.value for v in description.values if isinstance(v, StringValue)] == ["x,y"]
    assert request.count == 3
    assert request.sort == ("-_lastUpdated",)


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(FhirError) as caught:
        SearchBuilder(_Tasks()).where("nonsense", "1").request()
    assert caught.value.status == 400


async def test_read_or_none() -> None:
    assert await read_or_none(_Tasks({"t": {"id": "t"}}), "t") == {"id": "t"}
    assert await read_or_none(_Tasks(), "t") is None
    assert await read_or_none(_Tasks(error=gone("deleted")), "t") is None
    forbidden = FhirError(403, [])
    with pytest.raises(FhirError):
        await read_or_none(_Tasks(error=forbidden), "t")
    assert await read_or_none(_Tasks(error=forbidden), "t", also_absent=(403,)) is None
