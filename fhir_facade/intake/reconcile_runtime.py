"""The wiring of reconciliation (ADR 0039): the stage that resolves reconcile Tasks and the arrival
check the change-feed watcher asks before it publishes a study. Made by app.py when Orthanc's REST
API is configured and FACADE_RECONCILE_ENABLED is on."""

from __future__ import annotations

from collections.abc import Mapping

from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.config import Settings
from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.intake.reconcile import ArrivalReconciler
from fhir_facade.intake.reconcile_pacs import OrthancInstances, StudyCorrector
from fhir_facade.intake.reconcile_stage import ReconcileStage
from fhir_facade.watcher.change_feed import StudyArrived

__all__ = ["MODIFYING_SYSTEM", "ReconcileRuntime"]

#: Modifying System (0400,0563) of the facade's corrections.
MODIFYING_SYSTEM = "fhir-facade"


class ReconcileRuntime:
    """`stage` goes into the pipeline after the authorization; `bind` once the pipelined providers
    exist; `hold` is what the watcher asks of each stable study."""

    def __init__(
        self,
        settings: Settings,
        orthanc: OrthancRestClient,
        ctx: MappingContext,
        recorder: AuditRecorder | None,
    ) -> None:
        self._settings = settings
        self._ctx = ctx
        corrector = StudyCorrector(
            OrthancInstances(orthanc),
            modifying_system=MODIFYING_SYSTEM,
            spool=settings.data_dir / "reconcile-spool",
        )
        self.stage = ReconcileStage(corrector, ctx, settings.base_url, recorder)
        self._reconciler: ArrivalReconciler | None = None

    def bind(self, visible: Mapping[str, ResourceProvider], stored_patients: ResourceProvider) -> None:
        """`stored_patients` is the SQL store's Patient provider: a PatientID is *known* when an EHR
        stored a Patient with it, not when the PACS's own DICOM view shows it."""
        self.stage.bind(visible)
        self._reconciler = ArrivalReconciler(
            tasks=visible["Task"],
            orders=visible["ServiceRequest"],
            patients=visible["Patient"],
            stored_patients=stored_patients,
            ctx=self._ctx,
            require_known_patient=self._settings.reconcile.require_known_patient,
            base_url=self._settings.base_url,
        )

    async def hold(self, study: StudyArrived) -> bool:
        """True when the study waits for reconciliation (the server's own work, ADR 0009)."""
        if self._reconciler is None:
            raise RuntimeError("ReconcileRuntime.bind was not called")
        with origin_scope(Origin.INTERNAL):
            return await self._reconciler.hold(study)
