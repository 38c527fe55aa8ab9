"""The contract every resource provider implements (one provider per FHIR resource type).

Like HAPI's IResourceProvider: a provider says which type it serves, which search parameters and
interactions it supports, and implements them. The router only dispatches; the
CapabilityStatement is generated from these declarations, so it lists exactly what works.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.search import SearchParamDef, SearchRequest

__all__ = ["ResourceProvider"]


class ResourceProvider(ABC):
    """Read and search for one resource type (FHIR http.html#read, http.html#search)."""

    resource_type: ClassVar[str]
    profile: ClassVar[str | None] = None
    documentation: ClassVar[str] = ""
    search_params: ClassVar[tuple[SearchParamDef, ...]] = ()
    sortable: ClassVar[frozenset[str]] = frozenset()

    @property
    def interactions(self) -> tuple[str, ...]:
        return ("read", "search-type")

    @property
    def search_param_map(self) -> dict[str, SearchParamDef]:
        return {p.name: p for p in self.search_params}

    @abstractmethod
    async def read(self, resource_id: str) -> dict[str, Any]:
        """Return the resource or raise `not_found`."""

    @abstractmethod
    async def search(self, request: SearchRequest) -> SearchResult:
        """Return one page of matches for a parsed search."""
