"""FHIR responses and the one place where errors become OperationOutcome responses.

An error never costs the client its connection: an unexpected exception is answered with a 500
OperationOutcome inside the application (`ServerErrorMiddleware`, which Starlette puts outside
everything, answers and then re-raises, and the server then closes the keep-alive connection, so
the client's next request on it was reset). A 405 names exactly the methods its path supports
(RFC 9110 15.5.6: Allow is required on 405).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_facade.fhir.errors import FhirError, Issue, internal_error
from fhir_facade.fhir.negotiation import FHIR_JSON, wants_pretty

__all__ = ["allowed_methods", "error_response", "fhir_response", "install_error_handlers"]

log = logging.getLogger(__name__)


def fhir_response(
    body: dict[str, Any],
    request: Request | None = None,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """Serialise a resource as `application/fhir+json` (indented with `_pretty=true`)."""
    pretty = request is not None and wants_pretty(request)
    content = json.dumps(
        body,
        ensure_ascii=False,
        indent=2 if pretty else None,
        separators=None if pretty else (",", ":"),
    )
    return Response(
        content.encode("utf-8"),
        status_code=status,
        media_type=f"{FHIR_JSON}; charset=utf-8",
        headers=headers,
    )


def error_response(error: FhirError, request: Request | None = None) -> Response:
    """The OperationOutcome response of `error`, with its status and headers. Outside a route
    (in a middleware) `request` is None; the body is then not pretty-printed."""
    headers = dict(error.headers)
    if error.status == 405 and request is not None and "Allow" not in headers:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return fhir_response(error.operation_outcome(), request, status=error.status, headers=headers)


#: The methods an Allow header may name, in the order it names them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the application answers at this request's path. Starlette
    answers 405 from the first route whose path matches and names only that route's methods, but
    the FHIR router has one route per method; so each method is tried against all routes."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


class UnexpectedErrorMiddleware:
    """Answers an exception that no handler took with a 500 OperationOutcome and logs it, inside
    the application, so the server keeps the connection (see the module doc). Installed innermost
    of the middlewares, so the audit, CORS and correlation layers see an ordinary 500 response.
    When the response had already started, nothing can be answered: the exception goes on and the
    server closes the connection, as it must with a response cut short."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            log.exception("Unhandled error on %s %s", scope["method"], scope.get("path"))
            await error_response(internal_error())(scope, receive, send)


def install_error_handlers(
    app: FastAPI, translators: Mapping[type[Exception], Callable[[Any], FhirError]] | None = None
) -> None:
    """Map every failure to an OperationOutcome with the right status; never a stack trace.
    Call it before adding any other middleware (`UnexpectedErrorMiddleware` is innermost).

    `translators` turn the typed errors of other parts of the server (e.g. the PACS client's,
    `dicomweb.outcomes.PACS_ERROR_TRANSLATORS`) into FhirErrors; this module names none of them,
    so the REST machinery imports nothing of DICOM (ADR 0025)."""
    app.add_middleware(UnexpectedErrorMiddleware)

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, exc: FhirError) -> Response:
        if exc.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc)
        return error_response(exc, request)

    for exc_type, translate in (translators or {}).items():
        app.add_exception_handler(exc_type, _translated(translate))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        issues = [
            Issue(
                "invalid",
                f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}",
                expression=tuple(str(err["loc"][-1]) for _ in [0] if err.get("loc")),
            )
            for err in exc.errors()
        ] or [Issue("invalid", "Invalid request")]
        return error_response(FhirError(400, issues), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            detail = f"No FHIR interaction at {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers.pop("Allow", None)  # Starlette's names one route's methods; error_response all
            detail = f"{request.method} is not supported at {request.url.path}"
        error = FhirError(exc.status_code, [Issue(code, detail)], headers)
        return error_response(error, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        return error_response(internal_error(), request)


def _translated(translate: Callable[[Any], FhirError]) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> Response:
        return error_response(translate(exc), request)

    return handler
