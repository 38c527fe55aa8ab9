"""The contract every resource provider implements (one provider per FHIR resource type).

Like HAPI's IResourceProvider: a provider says which type it serves, which search parameters and
interactions it supports, and implements them. The router only dispatches; the
CapabilityStatement is generated from these declarations, so it lists exactly what works.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import method_not_allowed
from fhir_facade.fhir.search import SearchParamDef, SearchRequest

__all__ = ["ResourceProvider", "WriteResult"]


@dataclass(frozen=True)
class WriteResult:
    """The stored resource (with meta.versionId/lastUpdated) and whether the write created it."""

    resource: dict[str, Any]
    created: bool


class ResourceProvider(ABC):
    """Read and search for one resource type (FHIR http.html#read, http.html#search)."""

    resource_type: ClassVar[str]
    profile: ClassVar[str | None] = None
    documentation: ClassVar[str] = ""
    search_params: ClassVar[tuple[SearchParamDef, ...]] = ()
    sortable: ClassVar[frozenset[str]] = frozenset()
    #: search parameter -> element paths holding the Reference(s), for _include/_revinclude
    #: (fhir/element_paths.py; the registry's reference parameters, fhir/registry.py)
    include_paths: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Extensions on this type's CapabilityStatement.rest.resource entry (e.g. the Subscriptions
    #: Backport IG's capabilitystatement-subscriptiontopic-canonical on Subscription).
    capability_extensions: ClassVar[tuple[dict[str, Any], ...]] = ()

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

    # Write interactions: virtual types keep these defaults (405); persistent providers override
    # them and list them in `interactions`.

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """FHIR http.html#create: store a new resource with a server-assigned id."""
        raise method_not_allowed(f"{self.resource_type} is read-only here")

    async def update(
        self, resource_id: str, resource: dict[str, Any], *, if_match: str | None
    ) -> WriteResult:
        """FHIR http.html#update (update-as-create allowed); `if_match` is the ETag to check."""
        raise method_not_allowed(f"{self.resource_type} is read-only here")

    async def delete(self, resource_id: str) -> None:
        """FHIR http.html#delete."""
        raise method_not_allowed(f"{self.resource_type} is read-only here")

    async def vread(self, resource_id: str, version_id: str) -> dict[str, Any]:
        """FHIR http.html#vread."""
        raise method_not_allowed(f"{self.resource_type} keeps no versions here")

    async def history(
        self, resource_id: str | None, count: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        """FHIR http.html#history: versions (newest first) of one resource, or of the type when
        `resource_id` is None, as (page of entries, total). Deleted versions carry only
        resourceType, id and meta plus `"_deleted": True` for the Bundle builder."""
        raise method_not_allowed(f"{self.resource_type} keeps no history here")
