"""The HTTP side of FHIR writes, shared by every persistent type: version headers, `Prefer:
return`, conditional create/update resolution and history Bundles (FHIR R4 http.html)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request, Response

from fhir_facade.fhir.conditional_guard import ConditionalGuard, guarded
from fhir_facade.fhir.errors import Issue, bad_request, precondition_failed
from fhir_facade.fhir.prefer import return_preference
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.fhir.search import parse_search
from fhir_facade.fhir.settings import RestSettings
from fhir_facade.fhir.write_warnings import collecting
from fhir_facade.http_dates import http_date

__all__ = [
    "Written",
    "conditionally_update",
    "create_resource",
    "history_bundle",
    "update_resource",
    "version_headers",
    "write_response",
]


@dataclass(frozen=True)
class Written:
    """Outcome of a write: the stored resource, the HTTP status, whether to send Location, and the
    warnings the provider raised about it (`write_warnings`)."""

    resource: dict[str, Any]
    status: int
    location: bool
    warnings: tuple[Issue, ...] = ()


async def _create(provider: ResourceProvider, resource: dict[str, Any]) -> Written:
    with collecting() as warnings:
        created = await provider.create(resource)
    return Written(created, 201, location=True, warnings=tuple(warnings))


def version_headers(resource: dict[str, Any], base_url: str, *, location: bool = False) -> dict[str, str]:
    """ETag W/"n", Last-Modified and (for creates) Location of the version (http.html#versioning)."""
    meta = resource.get("meta", {})
    headers: dict[str, str] = {}
    version = meta.get("versionId")
    if version:
        headers["ETag"] = f'W/"{version}"'
    if meta.get("lastUpdated"):
        moment = datetime.fromisoformat(meta["lastUpdated"].replace("Z", "+00:00"))
        headers["Last-Modified"] = http_date(moment)  # RFC 9110 8.8.2: an HTTP-date, in GMT
    if location and version:
        headers["Location"] = f"{base_url}/{resource['resourceType']}/{resource['id']}/_history/{version}"
    return headers


def write_response(written: Written, request: Request, settings: RestSettings) -> Response:
    """The answer to a create/update, shaped by `Prefer: return` (http.html#ops). The provider's
    warnings are the OperationOutcome's further issues; without `return=OperationOutcome` the body is
    the resource, as http.html#ops says an OperationOutcome is returned only when asked for."""
    resource = written.resource
    headers = version_headers(resource, settings.base_url, location=written.location)
    preference = return_preference(request)
    if preference == "minimal":
        return Response(status_code=written.status, headers=headers)
    if preference == "OperationOutcome":
        version = resource.get("meta", {}).get("versionId")
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"{resource['resourceType']}/{resource['id']} stored as version {version}",
                },
                *(issue.to_fhir() for issue in written.warnings),
            ],
        }
        return fhir_response(outcome, request, status=written.status, headers=headers)
    return fhir_response(resource, request, status=written.status, headers=headers)


async def create_resource(
    provider: ResourceProvider, resource: dict[str, Any], if_none_exist: str | None, settings: RestSettings
) -> Written:
    """Create, or with If-None-Exist return the single existing match (http.html#ccreate). The
    search and the create are one atomic step (`conditional_guard`): of many identical
    conditional creates at once, one creates and the others answer 200 with its resource."""
    if if_none_exist is None:
        return await _create(provider, resource)
    params = criteria_params(if_none_exist, "If-None-Exist")

    async def attempt(guard: ConditionalGuard) -> Written:
        with guard.searching():
            matches = await conditional_matches(provider, params, settings)
        existing = single_match(matches, "If-None-Exist")
        if existing is not None:
            return Written(existing, 200, location=False)
        with guard.writing():
            return await _create(provider, resource)

    return await guarded(provider.resource_type, params, attempt)


async def update_resource(
    provider: ResourceProvider, resource_id: str, resource: dict[str, Any], if_match: str | None
) -> Written:
    """Update (or update-as-create); the body's id must be the URL's (http.html#update)."""
    if resource.get("id") != resource_id:
        raise bad_request(
            f"The body's id ({resource.get('id')!r}) must equal the URL's ({resource_id!r})",
            expression=f"{provider.resource_type}.id",
        )
    with collecting() as warnings:
        result = await provider.update(resource_id, resource, if_match=if_match)
    return Written(
        result.resource, 201 if result.created else 200, location=result.created, warnings=tuple(warnings)
    )


async def conditionally_update(
    provider: ResourceProvider,
    criteria: Sequence[tuple[str, str]] | str,
    resource: dict[str, Any],
    if_match: str | None,
    settings: RestSettings,
) -> Written:
    """PUT Type?criteria (http.html#cond-update): 0 matches create (with the body's id if it has
    one), 1 updates that resource, more than one is 412. Search and write are one atomic step
    (`conditional_guard`), so identical concurrent requests create one resource and update it."""
    params = criteria_params(criteria, "conditional update")

    async def attempt(guard: ConditionalGuard) -> Written:
        with guard.searching():
            matches = await conditional_matches(provider, params, settings)
        match = single_match(matches, "The conditional update")
        if match is not None and resource.get("id") not in (None, match["id"]):
            raise bad_request(
                f"The body's id {resource['id']!r} differs from the matched "
                f"{provider.resource_type}/{match['id']}",
                expression=f"{provider.resource_type}.id",
            )
        with guard.writing():
            if match is not None:
                return await update_resource(provider, match["id"], {**resource, "id": match["id"]}, if_match)
            if resource.get("id"):
                return await update_resource(provider, resource["id"], resource, None)
            return await _create(provider, resource)

    return await guarded(provider.resource_type, params, attempt)


def criteria_params(query: str | Sequence[tuple[str, str]], header: str) -> list[tuple[str, str]]:
    """The search criteria of a conditional interaction: its parameters without the result
    parameters (`_count`, `_sort`...; `_id` is a criterion). None left is a 400."""
    params = parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else list(query)
    params = [(k, v) for k, v in params if not k.startswith("_") or k == "_id"]
    if not params:
        raise bad_request(f"{header} needs search criteria", expression=header)
    return params


async def conditional_matches(
    provider: ResourceProvider, params: Sequence[tuple[str, str]], settings: RestSettings
) -> list[dict[str, Any]]:
    """Resources matching the criteria of a conditional interaction (at most two are needed to
    tell 0, 1 or many). Criteria are parsed strictly: an unknown parameter would widen the match."""
    request = parse_search(
        provider.resource_type,
        list(params),
        provider.search_param_map,
        base_url=settings.base_url,
        strict=True,
        default_count=2,
        max_count=2,
    )
    result = await provider.search(request)
    return result.matches[:2]


def single_match(matches: list[dict[str, Any]], header: str) -> dict[str, Any] | None:
    """0 -> None, 1 -> the match, more -> 412 (http.html#ccreate, #cond-update)."""
    if len(matches) > 1:
        raise precondition_failed(f"{header} matches more than one resource")
    return matches[0] if matches else None


def history_bundle(entries: list[dict[str, Any]], total: int, base_url: str, self_url: str) -> dict[str, Any]:
    """A `history` Bundle: newest first, with request/response per entry (http.html#history)."""
    bundle_entries = []
    for version in entries:
        meta = version.get("meta", {})
        url = f"{version['resourceType']}/{version['id']}"
        deleted = version.get("_deleted", False)
        entry: dict[str, Any] = {"fullUrl": f"{base_url}/{url}"}
        if not deleted:
            entry["resource"] = {k: v for k, v in version.items() if k != "_deleted"}
        first = meta.get("versionId") == "1"
        entry["request"] = {
            "method": "DELETE" if deleted else ("POST" if first else "PUT"),
            "url": version["resourceType"] if first and not deleted else url,
        }
        entry["response"] = {
            "status": "204" if deleted else ("201" if first else "200"),
            "etag": f'W/"{meta.get("versionId")}"',
            "lastModified": meta.get("lastUpdated"),
        }
        bundle_entries.append(entry)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "history",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
    }
    if bundle_entries:
        bundle["entry"] = bundle_entries
    return bundle
