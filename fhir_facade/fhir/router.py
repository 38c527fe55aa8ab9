"""FHIR REST routing: one read/search route set per registered provider, plus `metadata`.

Handlers are thin and identical in shape: negotiate, parse, call the provider, wrap the answer.
Routes are generated per type (not one `/{type}` catch-all) so the OpenAPI document names every
path and search parameter, which is what schemathesis and API explorers read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request, Response
from fastapi.params import Depends as DependsParam

from fhir_facade.fhir.bundle_processing import Atomic, process_bundle
from fhir_facade.fhir.bundles import searchset_bundle
from fhir_facade.fhir.capability import capability_statement
from fhir_facade.fhir.errors import bad_request, not_found, not_supported
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.includes import resolve_includes
from fhir_facade.fhir.negotiation import check_request_body_type, negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.prefer import prefers_strict_handling
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.request_body import read_resource
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.fhir.search import MAX_OFFSET, SearchParamType, parse_search
from fhir_facade.fhir.settings import RestSettings
from fhir_facade.fhir.write_interactions import (
    conditionally_update,
    create_resource,
    history_bundle,
    update_resource,
    version_headers,
    write_response,
)

__all__ = ["build_fhir_router"]

_JSON_CONTENT = {"application/fhir+json": {"schema": {"type": "object"}}}
_OPENAPI_TYPES = {SearchParamType.NUMBER: {"type": "number"}}


def _search_openapi(provider: ResourceProvider) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "description": p.documentation,
            "schema": _OPENAPI_TYPES.get(p.type, {"type": "string"}),
        }
        for p in provider.search_param_map.values()
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


def build_fhir_router(
    providers: Sequence[ResourceProvider],
    settings: RestSettings,
    atomic: Atomic | None = None,
    operations: Mapping[str, Sequence[dict[str, str]]] | None = None,
    *,
    authenticate: Callable[..., Awaitable[Any]] | None = None,
    security: dict[str, Any] | None = None,
) -> APIRouter:
    """Routes for `metadata`, batch/transaction at the base, and each provider's interactions.
    `atomic` opens a store transaction; without it only batches are accepted. `authenticate` runs
    before every route but `metadata` (which SMART clients read before they have a token);
    `security` is the CapabilityStatement's rest.security."""
    router = APIRouter(prefix="/fhir")
    by_type = {p.resource_type: p for p in providers}
    guarded: list[DependsParam] = [Depends(authenticate)] if authenticate else []
    # What `POST [base]` below serves (rest.interaction): batches always, transactions with a store.
    system_interactions = ("transaction", "batch") if atomic else ("batch",)

    @router.post(
        "/",
        summary="batch or transaction Bundle, at the base URL with a trailing slash",
        openapi_extra={"requestBody": {"content": _JSON_CONTENT}},
        responses={200: {"content": _JSON_CONTENT}, **error_responses(404, 405, 409, 410, 412, 422)},
        dependencies=guarded,
    )
    @router.post(
        "",
        summary="batch or transaction Bundle (FHIR R4 http.html#transaction)",
        openapi_extra={"requestBody": {"content": _JSON_CONTENT}},
        # A transaction fails as a whole with the status of the entry that failed.
        responses={200: {"content": _JSON_CONTENT}, **error_responses(404, 405, 409, 410, 412, 422)},
        dependencies=guarded,
    )
    async def bundle(request: Request) -> Response:
        negotiate_response_format(request)
        body = await read_resource(request, "Bundle")
        return fhir_response(await process_bundle(body, by_type, settings, atomic), request)

    @router.get(
        "/metadata",
        summary="CapabilityStatement (FHIR R4 http.html#capabilities)",
        responses={200: {"content": _JSON_CONTENT}},
    )
    async def metadata(request: Request) -> Response:
        negotiate_response_format(request)
        statement = capability_statement(
            providers, settings, operations, security=security, system_interactions=system_interactions
        )
        return fhir_response(statement, request)

    for provider in providers:
        _add_provider_routes(router, provider, settings, by_type, guarded)

    # Documented with their one answer (never a 200): a client learns that other types are refused.
    unsupported: dict[str, Any] = {
        "summary": "Any other resource type: not supported here (see metadata for the types)",
        "status_code": 404,
        "response_description": "The resource type is not supported (not-supported)",
        "responses": error_responses(404),
        "response_class": Response,
        "dependencies": guarded,
    }

    @router.get("/{resource_type}", **unsupported)
    @router.get("/{resource_type}/{resource_id}", **unsupported)
    async def unknown_type(request: Request, resource_type: str) -> Response:
        if resource_type in by_type:  # pragma: no cover - matched by the specific routes
            raise not_found(request.url.path)
        raise not_supported(f"Resource type '{resource_type}' is not supported by this server")

    return router


def _add_provider_routes(
    router: APIRouter,
    provider: ResourceProvider,
    settings: RestSettings,
    providers: dict[str, ResourceProvider],
    guarded: list[DependsParam],
) -> None:
    type_name = provider.resource_type

    async def run_search(request: Request, params: list[tuple[str, str]]) -> Response:
        search = parse_search(
            type_name,
            params,
            provider.search_param_map,
            base_url=settings.base_url,
            strict=prefers_strict_handling(request),
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
            sortable=provider.sortable,
        )
        result = await provider.search(search)
        if search.includes or search.revincludes:
            result.includes = await resolve_includes(
                search, result.matches[: search.count], providers, settings
            )
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
        if not is_fhir_id(resource_id):
            raise not_found(f"{type_name}/{resource_id} is not a valid resource id")
        resource = await provider.read(resource_id)
        return fhir_response(resource, request, headers=version_headers(resource, settings.base_url))

    async def create(request: Request) -> Response:
        """POST {type}, optionally conditional on If-None-Exist (http.html#create, #ccreate)."""
        negotiate_response_format(request)
        resource = await read_resource(request, type_name)
        written = await create_resource(provider, resource, request.headers.get("if-none-exist"), settings)
        return write_response(written, request, settings)

    async def update(request: Request, resource_id: str) -> Response:
        """PUT {type}/{id} (http.html#update)."""
        negotiate_response_format(request)
        resource = await read_resource(request, type_name)
        written = await update_resource(provider, resource_id, resource, request.headers.get("if-match"))
        return write_response(written, request, settings)

    async def conditional_update(request: Request) -> Response:
        """PUT {type}?criteria (http.html#cond-update)."""
        negotiate_response_format(request)
        resource = await read_resource(request, type_name)
        criteria = list(request.query_params.multi_items())
        written = await conditionally_update(
            provider, criteria, resource, request.headers.get("if-match"), settings
        )
        return write_response(written, request, settings)

    async def delete(request: Request, resource_id: str) -> Response:
        """DELETE {type}/{id} (http.html#delete): 204, also for an already deleted resource."""
        negotiate_response_format(request)
        await provider.delete(resource_id)
        return Response(status_code=204)

    async def vread(request: Request, resource_id: str, version_id: str) -> Response:
        negotiate_response_format(request)
        if not is_fhir_id(resource_id) or not is_fhir_id(version_id):  # both are FHIR ids
            raise not_found(f"{type_name}/{resource_id} has no version '{version_id[:64]}'")
        resource = await provider.vread(resource_id, version_id)
        return fhir_response(resource, request, headers=version_headers(resource, settings.base_url))

    async def history_instance(request: Request, resource_id: str) -> Response:
        return await _history(request, resource_id)

    async def history_type(request: Request) -> Response:
        return await _history(request, None)

    async def _history(request: Request, resource_id: str | None) -> Response:
        negotiate_response_format(request)
        count = min(_int_param(request, "_count", settings.default_page_size), settings.max_page_size)
        offset = _int_param(request, "_offset", 0)
        entries, total = await provider.history(resource_id, count, offset)
        self_url = f"{settings.base_url}/{request.url.path.split('/fhir/', 1)[1]}"
        if request.url.query:
            self_url += f"?{request.url.query}"
        return fhir_response(history_bundle(entries, total, settings.base_url, self_url), request)

    interactions = set(provider.interactions)

    def answers(*errors: int, body: bool = False) -> dict[str, Any]:
        """The operation's success answers and the errors particular to it (install_openapi adds
        the common ones). With a body it is a write: 201 when it created the resource."""
        responses: dict[int | str, Any] = {"200": {"description": type_name, "content": _JSON_CONTENT}}
        if body:
            responses["201"] = {"description": f"{type_name} created", "content": _JSON_CONTENT}
        responses |= error_responses(*errors)
        return {"responses": responses, **({"requestBody": {"content": _JSON_CONTENT}} if body else {})}

    handlers: list[tuple[str, str, Callable[..., Awaitable[Response]], dict[str, Any]]] = [
        ("GET", f"/{type_name}", search, _search_openapi(provider)),
        ("POST", f"/{type_name}/_search", search_post, _search_openapi(provider)),
    ]
    if "history-type" in interactions:
        handlers.append(("GET", f"/{type_name}/_history", history_type, answers(400)))
    handlers.append(("GET", f"/{type_name}/{{resource_id}}", read, answers(404, 410)))
    if "create" in interactions:
        handlers.append(("POST", f"/{type_name}", create, answers(412, 422, body=True)))
    if "update" in interactions:
        handlers.append(("PUT", f"/{type_name}/{{resource_id}}", update, answers(409, 412, 422, body=True)))
        handlers.append(("PUT", f"/{type_name}", conditional_update, answers(409, 412, 422, body=True)))
    if "delete" in interactions:
        handlers.append(
            ("DELETE", f"/{type_name}/{{resource_id}}", delete, {"responses": error_responses(404, 409)})
        )
    if "history-instance" in interactions:
        handlers.append(
            ("GET", f"/{type_name}/{{resource_id}}/_history", history_instance, answers(400, 404))
        )
    if "vread" in interactions:
        handlers.append(
            ("GET", f"/{type_name}/{{resource_id}}/_history/{{version_id}}", vread, answers(404, 410))
        )
    for method, path, endpoint, openapi in handlers:
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            summary=f"{method} {type_name}",
            name=f"{type_name}-{endpoint.__name__}",
            openapi_extra=openapi,
            response_class=Response,
            status_code=204 if method == "DELETE" else None,
            dependencies=guarded,
        )


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_OFFSET:
        raise bad_request(
            f"'{name}' must be an integer from 0 to {MAX_OFFSET}, got '{raw[:40]}'", expression=name
        )
    return int(raw)
