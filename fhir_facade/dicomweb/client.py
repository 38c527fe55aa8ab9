"""Async QIDO-RS client (DICOM PS3.18 10.6) over one shared httpx connection pool.

Transport failures and PACS errors are converted here, at the boundary, into the typed errors
below; the FHIR layer maps them to OperationOutcomes. Nothing above this module sees httpx.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from fhir_facade.dicomweb.errors import DicomwebError, DicomwebUnavailable
from fhir_facade.dicomweb.pooled_client import PooledClient

__all__ = ["DicomJson", "DicomwebClient", "DicomwebError", "DicomwebUnavailable", "qido_datasets"]

log = logging.getLogger(__name__)

#: One DICOM JSON dataset (PS3.18 F.2): {"0020000D": {"vr": "UI", "Value": [...]}, ...}
DicomJson = dict[str, Any]


class DicomwebClient(PooledClient):
    """QIDO-RS searches at study, series and instance level.

    Opened in the application lifespan (`open`) and shared by all requests; `request_count`
    counts QIDO requests so tests and benchmarks can prove there is no N+1.
    """

    def __init__(
        self, base_url: str, *, timeout: float, max_connections: int, auth: tuple[str, str] | None = None
    ) -> None:
        super().__init__(
            base_url,
            timeout=timeout,
            max_connections=max_connections,
            headers={"Accept": "application/dicom+json"},
            auth=auth,
        )

    async def search_studies(
        self,
        query: Mapping[str, str],
        *,
        include_fields: Iterable[str] = (),
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[DicomJson]:
        """QIDO-RS SearchForStudies (PS3.18 10.6.1)."""
        return await self._qido("/studies", query, include_fields, limit, offset)

    async def search_series(
        self, query: Mapping[str, str], *, include_fields: Iterable[str] = ()
    ) -> list[DicomJson]:
        """QIDO-RS SearchForSeries across studies: `StudyInstanceUID` may be a UID list."""
        return await self._qido("/series", query, include_fields, None, None)

    async def search_instances(
        self, query: Mapping[str, str], *, include_fields: Iterable[str] = ()
    ) -> list[DicomJson]:
        """QIDO-RS SearchForInstances across studies and series."""
        return await self._qido("/instances", query, include_fields, None, None)

    async def _qido(
        self,
        path: str,
        query: Mapping[str, str],
        include_fields: Iterable[str],
        limit: int | None,
        offset: int | None,
    ) -> list[DicomJson]:
        params: list[tuple[str, str | int | float | bool | None]] = list(query.items())
        # One includefield per attribute: Orthanc ignores a comma-separated list (PS3.18 allows both).
        params += [("includefield", field) for field in include_fields]
        if limit is not None:
            params.append(("limit", str(limit)))
        if offset:
            params.append(("offset", str(offset)))
        return qido_datasets(await self._send("GET", path, params=params), path)


def qido_datasets(response: httpx.Response, path: str) -> list[DicomJson]:
    """The DICOM JSON datasets of a QIDO-RS answer: [] for 204 or an empty body; a 4xx or a body that
    is not a JSON array is a DicomwebError (the PACS's answer is unusable, not the client's request)."""
    if response.status_code == 204 or not response.content:
        return []
    if response.status_code >= 400:
        raise DicomwebError(f"PACS rejected {path} with {response.status_code}: {response.text[:200]}")
    try:
        body = response.json()
    except ValueError as exc:
        raise DicomwebError(f"PACS sent invalid DICOM JSON for {path}") from exc
    if not isinstance(body, list):
        raise DicomwebError(f"PACS sent {type(body).__name__}, not a list, for {path}")
    # PS3.18 8.3.4.6: a Warning header says the PACS ignored part of the query (e.g. an
    # unsupported attribute): the answer is a superset, so log it where operators look.
    if "warning" in response.headers:
        log.warning("QIDO %s: PACS warning %s", path, response.headers["warning"])
    return [item for item in body if isinstance(item, dict)]
