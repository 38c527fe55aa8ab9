"""FHIR REST routing: one read/search route set per registered provider, plus `metadata`.

Handlers are thin and identical in shape: negotiate, parse, call the provider, wrap the answer.
Routes are generated per type (not one `/{type}` catch-all) so the OpenAPI document names every
path and search parameter, which is what schemathesis and API explorers read.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response

from fhir_facade.config import Settings
from fhir_facade.fhir.bundles import searchset_bundle
from fhir_facade.fhir.capability import capability_statement
from fhir_facade.fhir.errors import not_found, not_supported
from fhir_facade.fhir.negotiation import check_request_body_type, negotiate_response_format
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.fhir.search import SearchParamType, parse_search
from fhir_facade.resources.base import ResourceProvider

__all__ = ["build_fhir_router"]

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_JSON_CONTENT = {"application/fhir+json": {"schema": {"type": "object"}}}
_OPENAPI_TYPES = {SearchParamType.NUMBER: {"type": "number"}}


def _strict(request: Request) -> bool:
    """`Prefer: handling=strict` (FHIR search.html#errors); lenient is the default."""
    prefer = request.headers.get("prefer", "")
    return any(p.strip().replace(" ", "") == "handling=strict" for p in prefer.split(","))


def _search_openapi(provider: ResourceProvider) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "description": p.documentation,
            "schema": _OPENAPI_TYPES.get(p.type, {"type": "string"}),
        }
        for p in provider.search_params
    ]
    params += [
        {"name": "_count", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {"name": "_offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {
            "name": "_summary",
            "in": "query",
            "schema": {"type": "string", "enum": ["true", "false", "count", "text", "data"]},
        },
        {"name": "_elements", "in": "query", "schema": {"type": "string"}},
        {
            "name": "_total",
            "in": "query",
            "schema": {"type": "string", "enum": ["none", "estimate", "accurate"]},
        },
        {"name": "_format", "in": "query", "schema": {"type": "string"}},
        {"name": "_pretty", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
        {"name": "Prefer", "in": "header", "schema": {"type": "string"}},
    ]
    return {
        "parameters": params,
        "responses": {"200": {"description": "searchset Bundle", "content": _JSON_CONTENT}},
    }


def build_fhir_router(providers: Sequence[ResourceProvider], settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/fhir")
    by_type = {p.resource_type: p for p in providers}

    @router.get(
        "/metadata",
        summary="CapabilityStatement (FHIR R4 http.html#capabilities)",
        responses={200: {"content": _JSON_CONTENT}},
    )
    async def metadata(request: Request) -> Response:
        negotiate_response_format(request)
        return fhir_response(capability_statement(providers, settings), request)

    for provider in providers:
        _add_provider_routes(router, provider, settings)

    @router.get("/{resource_type}", include_in_schema=False)
    @router.get("/{resource_type}/{resource_id}", include_in_schema=False)
    async def unknown_type(request: Request, resource_type: str) -> Response:
        if resource_type in by_type:  # pragma: no cover - matched by the specific routes
            raise not_found(request.url.path)
        raise not_supported(f"Resource type '{resource_type}' is not supported by this server")

    return router


def _add_provider_routes(router: APIRouter, provider: ResourceProvider, settings: Settings) -> None:
    type_name = provider.resource_type

    async def run_search(request: Request, params: list[tuple[str, str]]) -> Response:
        search = parse_search(
            type_name,
            params,
            provider.search_param_map,
            base_url=settings.base_url,
            strict=_strict(request),
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
            sortable=provider.sortable,
        )
        result = await provider.search(search)
        return fhir_response(searchset_bundle(settings.base_url, search, result), request)

    async def search(request: Request) -> Response:
        negotiate_response_format(request)
        return await run_search(request, list(request.query_params.multi_items()))

    async def search_post(request: Request) -> Response:
        """POST {type}/_search: parameters in the form body and/or the URL (http.html#search)."""
        negotiate_response_format(request)
        check_request_body_type(request, allow_form=True)
        body = (await request.body()).decode("utf-8", errors="replace")
        form = parse_qsl(body, keep_blank_values=True)
        return await run_search(request, list(request.query_params.multi_items()) + form)

    async def read(request: Request, resource_id: str) -> Response:
        negotiate_response_format(request)
        if not _FHIR_ID.match(resource_id):
            raise not_found(f"{type_name}/{resource_id} is not a valid resource id")
        resource = await provider.read(resource_id)
        return fhir_response(resource, request)

    handlers: list[tuple[str, str, Callable[..., Awaitable[Response]], dict[str, Any]]] = [
        ("GET", f"/{type_name}", search, _search_openapi(provider)),
        ("POST", f"/{type_name}/_search", search_post, _search_openapi(provider)),
        (
            "GET",
            f"/{type_name}/{{resource_id}}",
            read,
            {"responses": {"200": {"description": type_name, "content": _JSON_CONTENT}}},
        ),
    ]
    for method, path, endpoint, openapi in handlers:
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            summary=f"{method} {type_name}",
            name=f"{type_name}-{endpoint.__name__}",
            openapi_extra=openapi,
            response_class=Response,
        )
