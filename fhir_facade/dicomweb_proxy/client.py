"""The PACS side of the DICOMweb proxy: raw requests forwarded to the PACS's DICOMweb root.

Unlike the QIDO, WADO and STOW clients, this one does not interpret answers: it hands back the
PACS's status, headers and bytes, opened as a stream so that a whole study passes through one
chunk at a time. Transport failures, time-outs and 5xx still become `DicomwebUnavailable` in
`PooledClient`, so the error handler answers 503 `dicom_service_unavailable` as it does for FHIR.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

import httpx

from fhir_facade.dicomweb.client import DicomJson, qido_datasets
from fhir_facade.dicomweb.errors import DicomwebUnavailable
from fhir_facade.dicomweb.pooled_client import PooledClient

if TYPE_CHECKING:
    from fhir_facade.config import Settings

__all__ = ["DicomwebProxyClient", "UpstreamResponse"]

DICOM_JSON = "application/dicom+json"


class UpstreamResponse:
    """A PACS answer whose body has not been read yet; `aclose` releases the connection.

    The body is read raw (`aiter_raw`): bytes exactly as the PACS sent them, still gzip-encoded if
    it encoded them, so the PACS's Content-Length and Content-Encoding stay true for our client.
    """

    def __init__(self, response: httpx.Response, stack: AsyncExitStack, path: str) -> None:
        self.response = response
        self._stack = stack
        self._path = path

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body chunk by chunk; a failure half-way is a `DicomwebUnavailable` (the status line
        has been sent by then, so the caller can only abort the connection)."""
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise DicomwebUnavailable(f"PACS stopped sending {self._path}: {exc!r}") from exc

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body decoded (gzip undone), for answers the proxy rewrites (see `links`)."""
        try:
            async for chunk in self.response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise DicomwebUnavailable(f"PACS stopped sending {self._path}: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._stack.aclose()


class DicomwebProxyClient(PooledClient):
    """Forwards requests to the PACS's DICOMweb root (PS3.18 QIDO-RS, WADO-RS, STOW-RS).

    Shares nothing with the FHIR side's clients but the base class: its own pool, opened and closed
    in the application lifespan. It never adds credentials of the caller; the headers it sends are
    exactly those the router passes (plus httpx's Host, User-Agent and Connection, and the facade's
    own PACS credentials as Authorization when configured).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_connections: int,
        auth: tuple[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        super().__init__(
            base_url, timeout=timeout, max_connections=max_connections, auth=auth, transport=transport
        )

    async def open(self) -> None:
        await super().open()
        assert self._http is not None
        # One client serves every caller: a cookie the PACS (or a load balancer before it) sets for
        # one request must not be sent back on another caller's.
        self._http.cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomwebProxyClient:
        """The proxy client of `settings.dicomweb_url`, with the FHIR side's timeout and pool size."""
        return cls(
            settings.dicomweb_url,
            timeout=settings.dicomweb_timeout,
            max_connections=settings.dicomweb_max_connections,
            auth=settings.pacs_auth,
        )

    async def open_stream(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send one request and return the answer with its body unread. The caller must `aclose` it.

        `path` is relative to the DICOMweb root and already percent-encoded; `query` is a raw
        query string, sent as is. `content` may be a stream: give its Content-Length in `headers`
        (else httpx sends it chunked).
        """
        target = _target(path, query)
        stack = AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                self._stream(method, target, headers=dict(headers or {}), content=content)
            )
        except BaseException:
            await stack.aclose()
            raise
        return UpstreamResponse(response, stack, path)

    async def fetch(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send one request and read the whole (decoded) answer: for small answers only (QIDO
        results, STOW responses)."""
        return await self._send(method, _target(path, query), headers=dict(headers or {}), content=content)

    async def search(self, path: str, params: Sequence[tuple[str, str]]) -> list[DicomJson]:
        """A QIDO-RS query made by the proxy itself (ownership checks), as DICOM JSON datasets.

        A 4xx answer is a `DicomwebError`: the check cannot be decided, so the request is refused
        by the error handler (502) rather than let through.
        """
        response = await self._send(
            "GET", path, params=list(params), headers={"Accept": DICOM_JSON, "Accept-Encoding": "gzip"}
        )
        return qido_datasets(response, path)


def _target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path
