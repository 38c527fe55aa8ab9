"""The CapabilityStatement (FHIR R4 capabilitystatement.html), built from `capability/` plus the
registered providers, so it lists exactly the types, interactions and search parameters that work."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from fhir_facade import __version__
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchParamType
from fhir_facade.fhir.settings import RestSettings
from fhir_facade.package_data import data_path

__all__ = ["capability_statement"]

_RESULT_PARAMS = [
    ("_count", "number", "Page size (never more than asked; 0 = count only)."),
    ("_offset", "number", "Position of the page; used by the paging links."),
    ("_summary", "token", "true | text | data | count | false"),
    ("_elements", "token", "Comma-separated top-level elements to return."),
    ("_total", "token", "none | estimate | accurate (default accurate)."),
]


@cache
def _base() -> dict[str, Any]:
    path = data_path("capability") / "CapabilityStatement-base.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _search_includes(provider: ResourceProvider) -> list[str]:
    """`_include` values this type takes: one per reference parameter it can follow
    (`include_paths`, resolved by fhir/includes.py; search.html#include)."""
    return [f"{provider.resource_type}:{param}" for param in sorted(provider.include_paths)]


def _search_revincludes(target: str, providers: Sequence[ResourceProvider]) -> list[str]:
    """`_revinclude` values a search of `target` takes: every `Source:param` that includes can
    follow and whose search parameter accepts a reference to `target` (a parameter restricted to
    other target types, such as Task:patient for an ImagingStudy, is refused with 400)."""
    found = []
    for source in providers:
        for param in sorted(source.include_paths):
            definition = source.search_param_map.get(param)
            if definition is None or definition.type is not SearchParamType.REFERENCE:
                continue
            if definition.target_types and target not in definition.target_types:
                continue
            found.append(f"{source.resource_type}:{param}")
    return sorted(found)


def _resource_entry(
    provider: ResourceProvider,
    providers: Sequence[ResourceProvider],
    operations: Sequence[dict[str, str]],
) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if provider.capability_extensions:
        entry["extension"] = [dict(e) for e in provider.capability_extensions]
    entry["type"] = provider.resource_type
    if provider.profile:
        entry["profile"] = provider.profile
    if provider.documentation:
        entry["documentation"] = provider.documentation
    entry["interaction"] = [{"code": code} for code in provider.interactions]
    params = []
    for p in provider.search_param_map.values():
        item: dict[str, Any] = {"name": p.name, "type": p.type.value}
        if p.definition:
            item["definition"] = p.definition
        if p.documentation:
            item["documentation"] = p.documentation
        params.append(item)
    includes, revincludes = _search_includes(provider), _search_revincludes(provider.resource_type, providers)
    if includes:
        entry["searchInclude"] = includes
    if revincludes:
        entry["searchRevInclude"] = revincludes
    if params:
        entry["searchParam"] = params
    if operations:
        entry["operation"] = list(operations)
    return entry


def capability_statement(
    providers: Sequence[ResourceProvider],
    settings: RestSettings,
    operations: Mapping[str, Sequence[dict[str, str]]] | None = None,
    *,
    security: dict[str, Any] | None = None,
    system_interactions: Sequence[str] = (),
) -> dict[str, Any]:
    """The CapabilityStatement: the base from capability/ plus every registered provider and
    operation (`operations`: resource type -> [{name, definition}]), so only what works is listed;
    `security` (rest.security) when the server requires tokens; `system_interactions`
    (rest.interaction: transaction, batch, ...) as the router serves them."""
    operations = operations or {}
    statement = copy.deepcopy(_base())
    statement["software"]["version"] = __version__
    statement["implementation"] = {"description": "fhir-facade", "url": settings.base_url}
    rest = statement["rest"][0]
    if security:
        rest["security"] = security
    ordered = sorted(providers, key=lambda p: p.resource_type)
    rest["resource"] = [_resource_entry(p, ordered, operations.get(p.resource_type, ())) for p in ordered]
    if system_interactions:
        rest["interaction"] = [{"code": code} for code in system_interactions]
    rest["searchParam"] = [
        {"name": name, "type": kind, "documentation": doc} for name, kind, doc in _RESULT_PARAMS
    ]
    return statement
