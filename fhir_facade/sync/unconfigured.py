"""`$sync-status` and `$sync-replay` on a server without an upstream (FACADE_FHIR_UPSTREAM_URL
unset): a clear 501 `not-supported` instead of the FHIR router's "Resource type '$sync-status' is
not supported", which reads as if the client had misspelt a type.

501, not 404: the operations exist in this software and work once an upstream is configured, so
the request is valid but the server is not set up to fulfil it (RFC 9110 section 15.6.2, "the
server does not support the functionality required to fulfill the request"); FHIR http.html
keeps 404 for unknown types and resources. The same answer as a transaction without a store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from fhir_facade.fhir.errors import not_supported
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses

__all__ = ["build_unconfigured_sync_router"]

_NOT_CONFIGURED = "Upstream sync is not configured on this server (set FACADE_FHIR_UPSTREAM_URL)"


def build_unconfigured_sync_router() -> APIRouter:
    """The sync operations' paths, each answering 501 (mounted before the FHIR router), and
    documented so: their one answer is the 501, never a 200."""
    router = APIRouter(prefix="/fhir")
    answers: dict[str, Any] = {
        "status_code": 501,
        "response_description": _NOT_CONFIGURED,
        "responses": error_responses(501),
        "response_class": Response,
    }

    @router.get("/$sync-status", summary="Upstream sync status: not configured on this server", **answers)
    async def sync_status(request: Request) -> Response:
        negotiate_response_format(request)
        raise not_supported(f"$sync-status: {_NOT_CONFIGURED}", status=501)

    @router.post("/$sync-replay", summary="Upstream sync replay: not configured on this server", **answers)
    async def sync_replay(request: Request) -> Response:
        negotiate_response_format(request)
        raise not_supported(f"$sync-replay: {_NOT_CONFIGURED}", status=501)

    return router
