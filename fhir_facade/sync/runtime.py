"""The upstream sync as the application runs it: the worker in the lifespan (in-process by
default, or alone with `fhir-facade sync`), and its status and dead-letter replay over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from fhir_facade.config import Settings
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.store import ResourceStore
from fhir_facade.sync.outbox_queue import OutboxQueue
from fhir_facade.sync.upstream import UpstreamClient
from fhir_facade.sync.worker import SyncWorker

__all__ = ["SyncRuntime"]


class SyncRuntime:
    def __init__(
        self, settings: Settings, store: ResourceStore, providers: dict[str, ResourceProvider]
    ) -> None:
        upstream = settings.upstream
        assert upstream is not None, "SyncRuntime needs FACADE_FHIR_UPSTREAM_URL"
        self._settings = settings
        self.queue = OutboxQueue(store.engine)
        self.queue.subscribe_to(store.bus)  # every stored version gets its outbox row from now on
        self.upstream = UpstreamClient(upstream)

        async def read_virtual(resource_type: str, resource_id: str) -> dict[str, Any] | None:
            try:
                return await providers[resource_type].read(resource_id)
            except FhirError as error:
                if error.status in (404, 410):
                    return None
                raise

        self.worker = SyncWorker(
            store,
            self.queue,
            self.upstream,
            read_virtual,
            batch_size=settings.sync.batch_size,
            lease_seconds=settings.sync.lease_seconds,
        )
        self.router = self._build_router()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._settings.sync.in_process:
            self._stop.clear()
            self._task = asyncio.create_task(
                self.worker.run_forever(self._stop, self._settings.sync.poll_interval), name="upstream-sync"
            )

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.upstream.close()

    def status_parameters(self) -> dict[str, Any]:
        status = self.queue.status()
        lag = status.lag_seconds()
        parameters: list[dict[str, Any]] = [
            {"name": "upstream", "valueUrl": self.upstream.base_url},
            {"name": "pending", "valueInteger": status.pending},
            {"name": "sent", "valueInteger": status.sent},
            {"name": "dead", "valueInteger": status.dead},
            {"name": "lag-seconds", "valueDecimal": round(lag, 3)},
        ]
        for row, error in self.queue.dead_letters(limit=20):
            parameters.append(
                {
                    "name": "dead-letter",
                    "part": [
                        {"name": "resource", "valueString": f"{row.resource_type}/{row.resource_id}"},
                        {"name": "version", "valueString": str(row.version_id)},
                        {"name": "attempts", "valueInteger": row.attempts},
                        {"name": "upstream-answer", "valueString": (error or "")[:4000]},
                    ],
                }
            )
        return {"resourceType": "Parameters", "parameter": parameters}

    def metric_families(self) -> list[Metric]:
        """The outbox's depth and lag and this process's send counts, read at scrape time
        (prometheus-client custom collector families, exposed by `fhir_facade.metrics`)."""
        status = self.queue.status()
        return [
            GaugeMetricFamily(
                "fhir_facade_sync_pending", "Outbox rows waiting for the upstream.", value=status.pending
            ),
            GaugeMetricFamily(
                "fhir_facade_sync_dead", "Outbox rows the upstream refused (dead letters).", value=status.dead
            ),
            GaugeMetricFamily(
                "fhir_facade_sync_lag_seconds",
                "Age of the oldest pending outbox row.",
                value=round(status.lag_seconds(), 3),
            ),
            CounterMetricFamily(
                "fhir_facade_sync_sent", "Outbox rows sent by this process.", value=self.worker.sent
            ),
            CounterMetricFamily(
                "fhir_facade_sync_failures",
                "Failed upstream writes in this process.",
                value=self.worker.failures,
            ),
        ]

    def _build_router(self) -> APIRouter:
        router = APIRouter(prefix="/fhir")

        @router.get("/$sync-status", summary="Upstream sync: queue depth, lag, dead letters")
        async def sync_status(request: Request) -> Response:
            negotiate_response_format(request)
            return fhir_response(await asyncio.to_thread(self.status_parameters), request)

        @router.post("/$sync-replay", summary="Upstream sync: requeue every dead letter")
        async def sync_replay(request: Request) -> Response:
            negotiate_response_format(request)
            replayed = await asyncio.to_thread(self.queue.replay_dead)
            body = {
                "resourceType": "Parameters",
                "parameter": [{"name": "replayed", "valueInteger": replayed}],
            }
            return fhir_response(body, request)

        return router
