"""Conformance and terminology artifacts shipped as data (capability/, mappings/, operations/):
served read-only so that clients can fetch the ConceptMaps and CodeSystems the facade uses."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import not_found
from fhir_facade.fhir.search import (
    SearchClause,
    SearchParamDef,
    SearchParamType,
    SearchRequest,
    StringValue,
    TokenValue,
)
from fhir_facade.package_data import data_path
from fhir_facade.resources.base import ResourceProvider

__all__ = ["ArtifactProvider", "artifact_providers"]

ARTIFACT_FOLDERS = ("capability", "mappings", "operations")
_SPEC = "http://hl7.org/fhir/SearchParameter/"
# The CapabilityStatement base is a template for /metadata, not an artifact of its own.
_SKIP_TYPES = frozenset({"CapabilityStatement"})


def _load_artifacts() -> dict[str, dict[str, dict[str, Any]]]:
    by_type: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for folder in ARTIFACT_FOLDERS:
        path = data_path(folder)
        if not path.is_dir():
            continue
        for file in sorted(path.glob("*.json")):
            resource = json.loads(file.read_text(encoding="utf-8"))
            if resource.get("resourceType") and resource.get("id"):
                by_type[resource["resourceType"]][resource["id"]] = resource
    return by_type


def _matches(resource: dict[str, Any], clause: SearchClause) -> bool:
    name = clause.param.name
    for value in clause.values:
        if isinstance(value, TokenValue) and name == "_id" and value.code == resource["id"]:
            return True
        if isinstance(value, StringValue) and name == "url" and value.value == resource.get("url"):
            return True
    return False


class ArtifactProvider(ResourceProvider):
    """Read and search (by `_id`, `url`) over the artifacts of one resource type."""

    search_params = (
        SearchParamDef("_id", SearchParamType.TOKEN, "Logical id", _SPEC + "Resource-id"),
        SearchParamDef("url", SearchParamType.URI, "Canonical URL", _SPEC + "conformance-url"),
    )

    def __init__(self, resource_type: str, resources: dict[str, dict[str, Any]]) -> None:
        self.resource_type = resource_type  # type: ignore[misc]
        self.documentation = f"Read-only {resource_type} artifacts shipped with the facade."  # type: ignore[misc]
        self._resources = resources

    async def read(self, resource_id: str) -> dict[str, Any]:
        try:
            return self._resources[resource_id]
        except KeyError:
            raise not_found(f"{self.resource_type}/{resource_id} does not exist") from None

    async def search(self, request: SearchRequest) -> SearchResult:
        matches = [r for r in self._resources.values() if all(_matches(r, c) for c in request.clauses)]
        count = 0 if request.summary == "count" else request.count
        page = matches[request.offset : request.offset + count]
        return SearchResult(page, len(matches), request.offset + count < len(matches))


def artifact_providers() -> list[ArtifactProvider]:
    """One provider per artifact type found in the data folders."""
    return [
        ArtifactProvider(resource_type, resources)
        for resource_type, resources in sorted(_load_artifacts().items())
        if resource_type not in _SKIP_TYPES
    ]
