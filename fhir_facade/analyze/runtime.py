"""The `$analyze` feature as the application runs it: clients, warm inference backends, the job
runner and its worklist poller, started and stopped with the application's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter

from fhir_facade.analyze.endpoint import build_analyze_router
from fhir_facade.analyze.inference import create_backend
from fhir_facade.analyze.jobs import AnalysisJobs
from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.analyze.saliency import SaliencyOptions
from fhir_facade.analyze.service import Analyzer
from fhir_facade.auth.enforcement import AuthorizationStage
from fhir_facade.config import Settings
from fhir_facade.dicomweb import DicomwebClient
from fhir_facade.dicomweb.stow import StowClient
from fhir_facade.dicomweb.wado import WadoClient
from fhir_facade.fhir.pipeline import PipelinedProvider
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.resources.stored import StoredResourceProvider
from fhir_facade.store.leases import Leases

__all__ = ["ANALYZE_OPERATION", "AnalyzeRuntime"]

log = logging.getLogger(__name__)

ANALYZE_OPERATION = {
    "name": "analyze",
    "definition": "http://fhir-facade.org/fhir/OperationDefinition/analyze",
}


class AnalyzeRuntime:
    """Everything `$analyze` needs, built from Settings; `start`/`stop` run in the lifespan."""

    def __init__(
        self,
        settings: Settings,
        *,
        qido: DicomwebClient,
        atomic: Callable[[], AbstractAsyncContextManager[None]],
        providers: dict[str, ResourceProvider],
        visible: dict[str, PipelinedProvider],
        authorization: AuthorizationStage,
        leases: Leases,
    ) -> None:
        """`providers`: the unwrapped providers (the analyzer reads on the server's behalf once a job is
        authorized); `visible`: the pipelined ones, for what callers are handed, for checking a job's
        rights and for writing results; `atomic`: the store transaction a result is written in;
        `leases`: this replica's leases, held on the Tasks it runs (ADR 0032)."""
        self._settings = settings
        manifests = load_manifests()
        if settings.analyze.default_model not in manifests:
            raise ValueError(
                f"FACADE_ANALYZE_DEFAULT_MODEL={settings.analyze.default_model!r} is not one of "
                f"{sorted(manifests)}"
            )
        self.wado = WadoClient(
            settings.dicomweb_url,
            timeout=settings.dicomweb_timeout,
            max_connections=settings.dicomweb_max_connections,
            auth=settings.pacs_auth,
        )
        self.stow = (
            StowClient(settings.dicomweb_url, timeout=settings.dicomweb_timeout, auth=settings.pacs_auth)
            if settings.analyze.write_sr
            else None
        )
        self.analyzer = Analyzer(
            manifests=manifests,
            backends={},
            default_model=settings.analyze.default_model,
            studies=providers["ImagingStudy"],
            qido=qido,
            wado=self.wado,
            stow=self.stow,
            writers=visible,
            atomic=atomic,
            # presentedForm.url: a link the caller follows with its own token (ADR 0016)
            link_base=settings.dicomweb_link_url,
            timeout=settings.analyze.timeout,
            slice_applicability=settings.analyze.slice_applicability,
            saliency=SaliencyOptions(settings.analyze.saliency_patch, settings.analyze.saliency_stride)
            if settings.analyze.saliency
            else None,
            max_batch=settings.inference.max_batch,
            max_wait=settings.inference.max_wait_ms / 1000,
            decode_workers=settings.analyze.decode_workers,
        )
        tasks = providers["Task"]
        assert isinstance(tasks, StoredResourceProvider)
        self.jobs = AnalysisJobs(
            self.analyzer,
            tasks,
            visible,
            authorization,
            workers=settings.analyze.workers,
            base_url=settings.base_url,
            leases=leases,
        )
        self.router: APIRouter = build_analyze_router(self.jobs, settings.base_url)
        self.operations: dict[str, list[dict[str, str]]] = {"ImagingStudy": [ANALYZE_OPERATION]}
        self._stop = asyncio.Event()
        self._poller: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        """Open the PACS clients, create and warm up every model's session (a cold first run can
        take seconds, on CUDA more), and start the poller: it takes over the jobs of dead replicas
        always, and claims requested Tasks when the worklist is on."""
        await self.wado.open()
        if self.stow:
            await self.stow.open()
        for model_id, manifest in self.analyzer.manifests.items():
            backend = await asyncio.to_thread(create_backend, manifest, self._settings)
            await asyncio.to_thread(backend.warm_up)
            self.analyzer.backends[model_id] = backend
            log.info("Model %s %s ready on %s", model_id, manifest.version, ", ".join(backend.providers))
        self._stop.clear()
        self._poller = asyncio.create_task(
            self.jobs.run_worklist(
                self._stop, self._settings.analyze.poll_interval, requested=self._settings.analyze.worklist
            ),
            name="analysis-worklist",
        )

    async def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.jobs.close()
        await self.analyzer.aclose()
        for backend in self.analyzer.backends.values():
            backend.close()
        await self.wado.close()
        if self.stow:
            await self.stow.close()
