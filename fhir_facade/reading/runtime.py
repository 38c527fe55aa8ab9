"""The reading workflow's wiring (ADR 0033): the stage, the worklist consumers, the PACS copy."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter

from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.config import Settings
from fhir_facade.dicomweb.client import DicomwebClient
from fhir_facade.dicomweb.stow import StowClient
from fhir_facade.fhir.pipeline import EventBus, ResourceChanged
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.reading.agreement import AgreementRecorder
from fhir_facade.reading.critical import CriticalResults
from fhir_facade.reading.escalation import CriticalEscalation
from fhir_facade.reading.pacs_copy import ReportToPacs
from fhir_facade.reading.performance import AI_PERFORMANCE_OPERATION, build_performance_router
from fhir_facade.reading.stage import ReadingStage
from fhir_facade.reading.triage import TriageRules
from fhir_facade.reading.worklist import ReadingWorklist
from fhir_facade.watcher import TaskRule

__all__ = ["ReadingRuntime"]


class ReadingRuntime:
    """Built in `create_app` when FACADE_READING_ENABLED; `stage` goes after the authorization;
    `router` (`$ai-performance`, ADR 0034) is made by `subscribe`, once the pipelined providers exist."""

    def __init__(
        self,
        settings: Settings,
        qido: DicomwebClient,
        arrival_rule: TaskRule,
        recorder: AuditRecorder | None = None,
    ) -> None:
        self._settings = settings
        self._qido = qido
        self._arrival_rule = arrival_rule
        self.stage = ReadingStage()
        self.router: APIRouter | None = None
        self._recorder = recorder
        self.escalation: CriticalEscalation | None = None
        #: The operations this workflow adds to the CapabilityStatement, by resource type.
        self.operations: dict[str, list[dict[str, str]]] = {"DiagnosticReport": [AI_PERFORMANCE_OPERATION]}
        self.stow = (
            StowClient(settings.dicomweb_url, timeout=settings.dicomweb_timeout, auth=settings.pacs_auth)
            if settings.reading.pdf_to_pacs
            else None
        )

    def subscribe(self, bus: EventBus, visible: Mapping[str, ResourceProvider]) -> None:
        """Attach the consumers; `visible` are the pipelined providers by type."""
        section = self._settings.reading
        rules = TriageRules(
            urgent_threshold=section.urgent_threshold,
            low_confidence=section.low_confidence,
            critical_codes=section.critical_codes,
            negative_codes=section.negative_codes,
        )
        ReadingWorklist(
            visible["Task"],
            visible["Observation"],
            visible["ServiceRequest"],
            rules,
            arrival_rule=self._arrival_rule if section.on_arrival else None,
            base_url=self._settings.base_url,
        ).subscribe(bus)
        AgreementRecorder(dict(visible), base_url=self._settings.base_url).subscribe(bus)
        CriticalResults(dict(visible)).subscribe(bus)
        self.escalation = CriticalEscalation(
            dict(visible),
            self._recorder,
            timeout=section.critical_ack_timeout,
            interval=section.critical_check_interval,
            base_url=self._settings.base_url,
        )
        self.escalation.subscribe(bus)
        self.router = build_performance_router(visible["Observation"], self._settings.base_url)
        if self.stow is not None:
            bus.subscribe(ResourceChanged, ReportToPacs(self._qido, self.stow))

    async def start(self) -> None:
        if self.stow is not None:
            await self.stow.open()
        if self.escalation is not None:
            await self.escalation.start()

    async def stop(self) -> None:
        if self.escalation is not None:
            await self.escalation.stop()
        if self.stow is not None:
            await self.stow.close()
