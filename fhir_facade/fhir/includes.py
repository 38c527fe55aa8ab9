"""`_include` and `_revinclude` (FHIR R4 search.html#include) across providers, virtual or
persistent: a Task page can include its focus ImagingStudy, computed live from the PACS.

Bounded work: one read per distinct referenced resource (sent concurrently) for `_include`, one
search per `_revinclude`, independent of how the page's resources refer to each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from fhir_facade.fhir.element_paths import references_at
from fhir_facade.fhir.errors import FhirError, bad_request
from fhir_facade.fhir.internal_search import SearchBuilder, read_or_none
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.fhir.search import IncludeSpec, SearchRequest
from fhir_facade.fhir.settings import RestSettings

__all__ = ["resolve_includes"]

#: At most this many resources are pulled in by _revinclude per page.
MAX_REVINCLUDED = 200


def _include_element(
    providers: Mapping[str, ResourceProvider], spec: IncludeSpec, name: str
) -> tuple[str, ...]:
    provider = providers.get(spec.source_type)
    element = provider.include_paths.get(spec.param) if provider else None
    if element is None:
        raise bad_request(f"{name}={spec.source_type}:{spec.param} is not supported", expression=name)
    return element


async def _read_quietly(provider: ResourceProvider, resource_id: str) -> dict[str, Any] | None:
    # A dangling or deleted reference is not an error of the search, and a resource the caller
    # may not see (403: no scope for its type; 404: outside its patient compartment) is left out.
    return await read_or_none(provider, resource_id, also_absent=(403,))


async def _search_quietly(provider: ResourceProvider, search: SearchRequest) -> list[dict[str, Any]]:
    try:
        return (await provider.search(search)).matches
    except FhirError as error:
        if error.status == 403:  # no search scope for the _revinclude'd type: leave them out
            return []
        raise


async def resolve_includes(
    request: SearchRequest,
    matches: list[dict[str, Any]],
    providers: Mapping[str, ResourceProvider],
    settings: RestSettings,
) -> list[dict[str, Any]]:
    """The resources to add to a page with search.mode 'include', without duplicates."""
    wanted: dict[tuple[str, str], None] = {}
    for spec in request.includes:
        if spec.source_type != request.resource_type:
            raise bad_request(f"_include must start with {request.resource_type}", expression="_include")
        element = _include_element(providers, spec, "_include")
        for match in matches:
            for reference in references_at(match, element):
                target = local_target(reference, settings.base_url)
                if target is None:
                    continue
                target_type, target_id = target
                if target_type in providers and spec.target_type in (None, target_type):
                    wanted[(target_type, target_id)] = None
    reads = [_read_quietly(providers[t], i) for t, i in wanted]
    included = [r for r in await asyncio.gather(*reads) if r is not None]

    page_refs = [f"{m['resourceType']}/{m['id']}" for m in matches]
    for spec in request.revincludes:
        _include_element(providers, spec, "_revinclude")
        if not page_refs:
            break
        source = providers[spec.source_type]
        search = (
            SearchBuilder(source, base_url=settings.base_url)
            .where_any(spec.param, page_refs)
            .count(MAX_REVINCLUDED)
            .request()
        )
        included += await _search_quietly(source, search)

    seen = {(m["resourceType"], m["id"]) for m in matches}
    unique = []
    for resource in included:
        key = (resource["resourceType"], resource["id"])
        if key not in seen:
            seen.add(key)
            unique.append(resource)
    return unique
