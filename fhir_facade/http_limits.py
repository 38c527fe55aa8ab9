"""Request limits for every route: body size and body idle time, as a pure ASGI middleware, plus
the uvicorn settings that bound what comes before the body (headers, idle connections, load).

Why a middleware: the server only bounds the request head (uvicorn's
h11_max_incomplete_event_size) and the time between requests (timeout_keep_alive); a body is
handed to the application as it arrives, for as long as the client keeps the connection open.
Bounding it here holds under any ASGI server and covers every route the same way (FHIR, /auth,
$analyze, the DICOMweb proxy), before authentication or a handler does any work.

- Size (RFC 9110 15.5.14, 413 Content Too Large): a declared Content-Length above the limit is
  answered at once, before a byte of the body is read; a chunked body is counted while the
  application reads it, and the read fails with 413 when it passes the limit. STOW-RS (POST under
  /dicom-web, DICOM PS3.18 10.5) has its own, larger limit.
- Time (RFC 9110 15.5.9, 408 Request Timeout): while the application waits for body data, each
  wait is bounded (idle time between chunks, the semantics of nginx's client_body_timeout), so a
  client announcing `Content-Length: 1073741824` and sending ten bytes gets 408, not a connection
  held open forever.

Both answers are OperationOutcomes with `Connection: close`: the unread rest of the body must not
be taken for the next request on the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_facade.config import Settings
from fhir_facade.fhir.errors import payload_too_large, request_timeout
from fhir_facade.fhir.responses import error_response

__all__ = ["BodyLimits", "RequestLimitsMiddleware", "uvicorn_options"]

#: Where STOW-RS bodies arrive: the DICOMweb proxy (fhir_facade.dicomweb_proxy.router.PREFIX).
_STOW_PREFIX = "/dicom-web/"
#: ImagingStudy/$import (fhir_facade.intake.import_endpoint).
_IMPORT_SUFFIX = "/ImagingStudy/$import"


@dataclass(frozen=True)
class BodyLimits:
    """The limits the middleware enforces (see the `limits_*` settings)."""

    max_body_bytes: int
    max_stow_body_bytes: int
    body_timeout: float
    max_import_body_bytes: int = 16 * 1024**3

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            settings.limits.max_body_bytes,
            settings.limits.max_stow_body_bytes,
            settings.limits.body_timeout,
            settings.limits.max_import_body_bytes,
        )

    def for_request(self, scope: Scope) -> int:
        """The body limit of this request: STOW-RS's for a POST under /dicom-web, else the default."""
        if scope["method"] == "POST" and scope.get("path", "").startswith(_STOW_PREFIX):
            return self.max_stow_body_bytes
        if scope["method"] == "POST" and scope.get("path", "").endswith(_IMPORT_SUFFIX):
            return self.max_import_body_bytes  # spooled to disk as it arrives (ADR 0038)
        return self.max_body_bytes


def _declared_length(scope: Scope) -> int | None:
    """The Content-Length header as a number (None when absent; the server has already refused
    a malformed one, RFC 9112 6.3)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None
    return None


class RequestLimitsMiddleware:
    """Pure ASGI middleware enforcing `BodyLimits` on every HTTP request (see the module doc)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_request(scope)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await error_response(payload_too_large(limit))(scope, receive, send)
            return
        timeout = self.limits.body_timeout
        state: dict[str, Any] = {"received": 0, "complete": declared == 0}

        async def limited_receive() -> Message:
            # After the last body chunk, receive() only ever reports a disconnect; waiting for
            # that (a streaming response listens for it) must not time out.
            if state["complete"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError as exc:
                raise request_timeout(timeout) from exc
            if message["type"] != "http.request":
                state["complete"] = True
                return message
            state["received"] += len(message.get("body", b""))
            if state["received"] > limit:
                raise payload_too_large(limit)
            if not message.get("more_body", False):
                state["complete"] = True
            return message

        await self.app(scope, limited_receive, send)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.run()/uvicorn.Config keyword arguments for the limits the server enforces
    before the application sees a request: the head's size, idle keep-alive connections, and
    the number of connections and requests at once (503 above it)."""
    return {
        "timeout_keep_alive": settings.limits.keep_alive_timeout,
        "h11_max_incomplete_event_size": settings.limits.max_header_bytes,
        "limit_concurrency": settings.limits.max_concurrency,
    }
