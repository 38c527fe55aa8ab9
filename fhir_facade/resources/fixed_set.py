"""Providers over a small, fixed set of resources held in memory (Endpoints from configuration,
artifacts from the data folders): read by id, search by filtering every resource."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from fhir_facade.fhir.bundles import SearchResult, paged
from fhir_facade.fhir.errors import not_found
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchClause, SearchRequest

__all__ = ["FixedSetProvider"]


class FixedSetProvider(ResourceProvider):
    def __init__(self, resources: dict[str, dict[str, Any]]) -> None:
        self._resources = resources

    async def read(self, resource_id: str) -> dict[str, Any]:
        try:
            return self._resources[resource_id]
        except KeyError:
            raise not_found(f"{self.resource_type}/{resource_id} does not exist") from None

    async def search(self, request: SearchRequest) -> SearchResult:
        matches = [
            r for r in self._resources.values() if all(self.clause_matches(r, c) for c in request.clauses)
        ]
        return paged(matches, request)

    @abstractmethod
    def clause_matches(self, resource: dict[str, Any], clause: SearchClause) -> bool:
        """Whether one resource satisfies one clause (any of its ORed values)."""
