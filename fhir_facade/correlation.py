"""Correlation ids: one id per request (or background job), from the client's `X-Correlation-ID`
(else `X-Request-ID`) when it is acceptable, else a fresh uuid4; echoed on every response and
sent on every HTTP request the facade makes on that request's behalf (PACS, model server,
upstream FHIR server), so one grep finds a request in every log it touched.

The id lives in the `correlation_id` context variable: asyncio tasks and worker threads
(`asyncio.to_thread`, `run_in_threadpool`) copy the context, so code far from the request
(the store writing an outbox row, an httpx event hook) reads it without being handed it.
Work that no request started (the sync worker, the analysis worklist, the change feed) opens a
`correlation_scope()` per round or job, so its log lines and outgoing requests correlate too.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CORRELATION_HEADER",
    "REQUEST_ID_HEADER",
    "CorrelationIdFilter",
    "CorrelationIdMiddleware",
    "add_correlation_headers",
    "add_correlation_headers_async",
    "correlation_id",
    "correlation_scope",
    "current_correlation_id",
    "install_correlation",
    "is_valid_correlation_id",
    "new_correlation_id",
    "outgoing_headers",
]

CORRELATION_HEADER = "X-Correlation-ID"
REQUEST_ID_HEADER = "X-Request-ID"

#: What a client may send: 1-128 characters that are safe in a header, a log line and a URL
#: (no spaces, quotes, commas or control characters, so it cannot forge log fields or headers).
_ACCEPTABLE = re.compile(r"^[A-Za-z0-9._:@/+=\-]{1,128}$")
#: Both headers, lower-case as ASGI gives them; read in this order, both set on responses.
_HEADER_NAMES = (CORRELATION_HEADER.lower().encode("latin-1"), REQUEST_ID_HEADER.lower().encode("latin-1"))

#: The id of the request or background job being served; None outside both.
correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


def new_correlation_id() -> str:
    """A fresh id (uuid4, 32 hex digits)."""
    return uuid.uuid4().hex


def is_valid_correlation_id(value: str | None) -> bool:
    """Whether a client-supplied id is acceptable as ours (1-128 of [A-Za-z0-9._:@/+=-])."""
    return value is not None and _ACCEPTABLE.match(value) is not None


def current_correlation_id() -> str | None:
    """The id of the request or job this code runs for, if any."""
    return correlation_id.get()


@contextmanager
def correlation_scope(value: str | None = None, *, inherit: bool = False) -> Iterator[str]:
    """Run the block under a correlation id: `value`, else (with `inherit`) the current one,
    else a fresh one. Background work calls this once per round or job."""
    chosen = value or (correlation_id.get() if inherit else None) or new_correlation_id()
    token = correlation_id.set(chosen)
    try:
        yield chosen
    finally:
        correlation_id.reset(token)


def outgoing_headers() -> dict[str, str]:
    """The headers that carry the current id on an outgoing request ({} outside any scope)."""
    value = correlation_id.get()
    return {CORRELATION_HEADER: value, REQUEST_ID_HEADER: value} if value else {}


def add_correlation_headers(request: httpx.Request) -> None:
    """httpx request event hook (sync clients): stamp the current id on the request. The id of
    the scope wins over a header the caller set, so only checked ids ever leave the facade."""
    for name, value in outgoing_headers().items():
        request.headers[name] = value


async def add_correlation_headers_async(request: httpx.Request) -> None:
    """`add_correlation_headers` for httpx.AsyncClient (whose hooks must be coroutines)."""
    add_correlation_headers(request)


def _incoming_id(scope: Scope) -> str | None:
    headers = dict(scope.get("headers") or ())
    for name in _HEADER_NAMES:
        raw = headers.get(name)
        if raw is not None:
            value = raw.decode("latin-1")
            if is_valid_correlation_id(value):
                return value
    return None


class CorrelationIdMiddleware:
    """Pure ASGI middleware: choose the request's id (the client's `X-Correlation-ID`, else its
    `X-Request-ID`, when acceptable; else a uuid4), keep it in the `correlation_id` context
    variable and in `scope["state"]["correlation_id"]`, and set `X-Correlation-ID` and
    `X-Request-ID` on the response, whatever its status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = _incoming_id(scope) or new_correlation_id()
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        state["correlation_id"] = value
        encoded = value.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in _HEADER_NAMES]
                headers += [(name, encoded) for name in _HEADER_NAMES]
                message = {**message, "headers": headers}
            await send(message)

        token = correlation_id.set(value)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            correlation_id.reset(token)


class CorrelationIdFilter(logging.Filter):
    """Adds `correlation_id` ("-" outside a request or job) to every record it sees, for a
    format such as "%(asctime)s %(levelname)s [%(correlation_id)s] %(name)s: %(message)s".
    Attached to handlers (a logger's filters miss records propagated from child loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id.get() or "-"
        return True


def _attach_log_filter() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, CorrelationIdFilter) for f in handler.filters):
            handler.addFilter(CorrelationIdFilter())


def install_correlation(app: FastAPI) -> None:
    """Wrap `app` in `CorrelationIdMiddleware` as its outermost layer and add the log filter to
    the root logger's handlers. Outermost, not `add_middleware`: Starlette answers unhandled
    exceptions (500) in ServerErrorMiddleware, outside every user middleware, and that answer and
    its log line need the id too. Idempotent."""
    if getattr(app.state, "correlation_installed", False):
        return
    app.state.correlation_installed = True
    build = app.build_middleware_stack

    def build_with_correlation() -> ASGIApp:
        return CorrelationIdMiddleware(build())

    app.build_middleware_stack = build_with_correlation  # type: ignore[method-assign]
    _attach_log_filter()
