"""Prometheus exposition of the facade's counters at `GET /metrics`, by prometheus-client.

Every value is read when Prometheus scrapes (the clients count their own requests, the sync reads
its outbox), so the metrics are custom collectors (prometheus-client "custom collectors"), not
counters the code increments. Each application has its own `CollectorRegistry`, never the
library's global one: a process (a test session) may build many applications, and the global
registry refuses a second collector with the same metric names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["metrics_registry", "metrics_router"]

metrics_router = APIRouter()


class _FacadeCollector(Collector):
    """The PACS clients' request counts and, when the upstream sync runs, its queue metrics."""

    def __init__(self, app: FastAPI) -> None:
        self._state = app.state

    def collect(self) -> Iterator[Metric]:
        # CounterMetricFamily adds the `_total` suffix to the sample name.
        yield CounterMetricFamily(
            "fhir_facade_qido_requests",
            "QIDO-RS requests sent to the PACS.",
            value=self._state.dicomweb.request_count,
        )
        orthanc = getattr(self._state, "orthanc", None)
        if orthanc is not None:
            yield CounterMetricFamily(
                "fhir_facade_orthanc_requests",
                "Orthanc REST requests (e.g. counting).",
                value=orthanc.request_count,
            )
        sync = getattr(self._state, "sync", None)
        if sync is not None:
            families: Iterable[Metric] = sync.metric_families()
            yield from families


def metrics_registry(app: FastAPI) -> CollectorRegistry:
    """The application's own registry, made on first use."""
    registry: CollectorRegistry | None = getattr(app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_FacadeCollector(app))
        app.state.metrics_registry = registry
    return registry


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    tags=["monitoring"],
    response_class=PlainTextResponse,
)
async def metrics(request: Request) -> Response:
    """The Prometheus text exposition format; the sync's values come from the database, so the
    collection runs off the event loop."""
    registry = metrics_registry(request.app)
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
