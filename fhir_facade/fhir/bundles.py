"""Searchset Bundles (FHIR R4 bundle.html, search.html#paging) with links that work when followed.

Paging is offset based: `next`/`previous` repeat the request's own parameters (unknown ones already
dropped by the parser) with `_offset` and an explicit `_count`, so a followed link returns the
adjacent page of the same search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fhir_facade.fhir.elements import apply_elements, apply_summary
from fhir_facade.fhir.search import SearchRequest

__all__ = ["SearchResult", "paged", "searchset_bundle"]


@dataclass
class SearchResult:
    """What a provider returns for one page: matches, included resources, total and more-to-come."""

    matches: list[dict[str, Any]]
    total: int | None
    has_next: bool
    includes: list[dict[str, Any]] = field(default_factory=list)
    #: The paging snapshot the provider used (persistent types); repeated in the paging links.
    snapshot: datetime | None = None


def paged(matches: list[dict[str, Any]], request: SearchRequest) -> SearchResult:
    """One page of matches found in memory (`_summary=count` keeps only the total)."""
    count = 0 if request.summary == "count" else request.count
    page = matches[request.offset : request.offset + count]
    return SearchResult(page, len(matches), request.offset + count < len(matches))


def _page_url(base_url: str, request: SearchRequest, offset: int, snapshot: datetime | None) -> str:
    params = [(k, v) for k, v in request.link_params if k != "_count"]
    params.append(("_count", str(request.count)))
    if offset:
        params.append(("_offset", str(offset)))
    if snapshot is not None:
        params.append(("_snapshot", snapshot.isoformat()))
    return f"{base_url}/{request.resource_type}?{urlencode(params)}"


def searchset_bundle(base_url: str, request: SearchRequest, result: SearchResult) -> dict[str, Any]:
    """Build the searchset Bundle for one page of `result`."""
    snap = result.snapshot
    links = [{"relation": "self", "url": _page_url(base_url, request, request.offset, snap)}]
    count_only = request.summary == "count" or request.count == 0
    if not count_only:
        if request.offset > 0:
            previous = max(request.offset - request.count, 0)
            links.append({"relation": "previous", "url": _page_url(base_url, request, previous, snap)})
        if result.has_next:
            links.append(
                {
                    "relation": "next",
                    "url": _page_url(base_url, request, request.offset + request.count, snap),
                }
            )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    bundle["link"] = links
    if count_only:
        return bundle
    entries = [_entry(base_url, r, "match", request) for r in result.matches[: request.count]]
    entries += [_entry(base_url, r, "include", request) for r in result.includes]
    if entries:
        bundle["entry"] = entries
    return bundle


def _entry(base_url: str, resource: dict[str, Any], mode: str, request: SearchRequest) -> dict[str, Any]:
    shaped = apply_elements(apply_summary(resource, request.summary), request.elements)
    return {
        "fullUrl": f"{base_url}/{resource['resourceType']}/{resource['id']}",
        "resource": shaped,
        "search": {"mode": mode},
    }
