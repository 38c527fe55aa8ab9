"""Prometheus text exposition (version 0.0.4) of the facade's counters at `GET /metrics`.

Kept dependency-free: a handful of counters does not need a client library yet.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

__all__ = ["metrics_router"]

metrics_router = APIRouter()


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format 0.0.4)",
    tags=["monitoring"],
    response_class=PlainTextResponse,
)
async def metrics(request: Request) -> PlainTextResponse:
    dicomweb = request.app.state.dicomweb
    lines = [
        "# HELP fhir_facade_qido_requests_total QIDO-RS requests sent to the PACS.",
        "# TYPE fhir_facade_qido_requests_total counter",
        f"fhir_facade_qido_requests_total {dicomweb.request_count}",
    ]
    orthanc = request.app.state.orthanc
    if orthanc is not None:
        lines += [
            "# HELP fhir_facade_orthanc_requests_total Orthanc REST requests (e.g. counting).",
            "# TYPE fhir_facade_orthanc_requests_total counter",
            f"fhir_facade_orthanc_requests_total {orthanc.request_count}",
        ]
    sync = getattr(request.app.state, "sync", None)
    if sync is not None:
        lines += await asyncio.to_thread(sync.metrics_lines)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
