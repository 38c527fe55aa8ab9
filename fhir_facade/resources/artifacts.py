"""Conformance and terminology artifacts shipped as data (capability/, mappings/, operations/):
served read-only so that clients can fetch the ConceptMaps and CodeSystems the facade uses."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from fhir_facade.fhir.search import (
    SearchClause,
    SearchParamDef,
    SearchParamType,
    StringValue,
    TokenValue,
)
from fhir_facade.package_data import data_path
from fhir_facade.resources.fixed_set import FixedSetProvider

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


class ArtifactProvider(FixedSetProvider):
    """Read and search (by `_id`, `url`) over the artifacts of one resource type."""

    search_params = (
        SearchParamDef("_id", SearchParamType.TOKEN, "Logical id", _SPEC + "Resource-id"),
        SearchParamDef("url", SearchParamType.URI, "Canonical URL", _SPEC + "conformance-url"),
    )

    def __init__(self, resource_type: str, resources: dict[str, dict[str, Any]]) -> None:
        super().__init__(resources)
        self.resource_type = resource_type  # type: ignore[misc]
        self.documentation = f"Read-only {resource_type} artifacts shipped with the facade."  # type: ignore[misc]

    def clause_matches(self, resource: dict[str, Any], clause: SearchClause) -> bool:
        return _matches(resource, clause)


def artifact_providers(extra: Iterable[Mapping[str, Any]] = ()) -> list[ArtifactProvider]:
    """One provider per artifact type found in the data folders, plus `extra` resources the site
    configured (e.g. its procedure ConceptMaps), so clients can read every map the facade applies."""
    by_type = _load_artifacts()
    for resource in extra:
        if resource.get("resourceType") and resource.get("id"):
            by_type[resource["resourceType"]][resource["id"]] = dict(resource)
    return [
        ArtifactProvider(resource_type, resources)
        for resource_type, resources in sorted(by_type.items())
        if resource_type not in _SKIP_TYPES
    ]
