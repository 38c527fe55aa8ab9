"""The base of every PACS client (QIDO-RS, WADO-RS, STOW-RS, Orthanc REST): one shared httpx
connection pool opened in the application lifespan, a request counter for tests and benchmarks,
the one mapping of transport failures and 5xx answers to `DicomwebUnavailable`, the correlation
id of the request being served on every request sent (`X-Correlation-ID`), and the facade's own
PACS credentials (FACADE_PACS_USERNAME/_PASSWORD, HTTP Basic, RFC 7617) when it has them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Self

import httpx

from fhir_facade.correlation import add_correlation_headers_async
from fhir_facade.dicomweb.errors import DicomwebUnavailable

__all__ = ["PooledClient"]

log = logging.getLogger(__name__)


class PooledClient:
    """An async HTTP client of one PACS service (`transport` only for tests).

    `open` (lazily on first use too) creates the pool; `close` closes it. `_send` counts the
    request and raises `DicomwebUnavailable` when the PACS cannot be reached, times out or
    answers 5xx ("retry later"); other answers are the subclass's to judge.
    """

    #: What the error messages call the service ("PACS", "Orthanc").
    service_name = "PACS"

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_connections: int,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._headers = headers or {}
        self._auth = httpx.BasicAuth(*auth) if auth else None
        self._transport = transport  # tests: faults a real PACS cannot be made to produce
        self._http: httpx.AsyncClient | None = None
        self.request_count = 0

    async def open(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(self._timeout),
                limits=self._limits,
                headers=self._headers,
                auth=self._auth,
                transport=self._transport,
                event_hooks={"request": [add_correlation_headers_async]},
            )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; transport failures, time-outs and 5xx become DicomwebUnavailable."""
        async with self._stream(method, path, **kwargs) as response:
            await response.aread()
            return response

    @asynccontextmanager
    async def _stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """One request with the body left unread for the caller to stream; transport failures,
        time-outs (also while streaming) and 5xx become DicomwebUnavailable."""
        if self._http is None:
            await self.open()
        assert self._http is not None
        self.request_count += 1
        try:
            async with self._opened(method, path, **kwargs) as response:
                if response.status_code >= 500:
                    raise DicomwebUnavailable(
                        f"{self.service_name} answered {response.status_code} to {path}"
                    )
                yield response
        except httpx.TimeoutException as exc:
            raise DicomwebUnavailable(
                f"{self.service_name} did not answer {path} within {self._timeout} s"
            ) from exc
        except httpx.TransportError as exc:
            # The message becomes the 503 outcome's diagnostics: it names no PACS address (ADR 0016);
            # the log line does, for the operator.
            log.warning("%s unreachable at %s: %r", self.service_name, self.base_url, exc)
            raise DicomwebUnavailable(f"{self.service_name} unreachable: {type(exc).__name__}") from exc

    @asynccontextmanager
    async def _opened(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """The response to one request. A keep-alive connection the PACS closed just as the pool
        reused it fails with RemoteProtocolError before any answer (Orthanc closes idle ones); an
        idempotent request (GET, HEAD: RFC 9110 9.2.2) is then sent once more, on a new connection.
        Other methods are not repeated: the PACS may have acted on them."""
        assert self._http is not None
        retries = 1 if method in ("GET", "HEAD") else 0
        while True:
            stack = AsyncExitStack()
            try:
                response = await stack.enter_async_context(self._http.stream(method, path, **kwargs))
            except httpx.RemoteProtocolError as exc:
                await stack.aclose()
                if retries == 0:
                    raise
                retries -= 1
                log.info(
                    "%s closed a pooled connection (%r); sending %s %s again",
                    self.service_name,
                    exc,
                    method,
                    path,
                )
                continue
            break
        async with stack:
            yield response
