"""`DELETE ImagingStudy/{id}`: the study is deleted in Orthanc (ADR 0040).

Off unless FACADE_STUDY_DELETE_ENABLED (and FACADE_ORTHANC_URL: DICOMweb has no delete). The
ImagingStudy provider lists `delete` among its interactions only then, so the route, the OpenAPI
document and the CapabilityStatement all say so, and a DELETE without it is a 405. The interaction
runs through the pipeline like every other: the authorization stage needs the SMART v2 permission
`d` on ImagingStudy (`system/ImagingStudy.d`, `user/ImagingStudy.d`; a `patient/` one only for the
patient's own study), the audit stage records it (AuditEvent, restful-interaction `delete`), and
the bus publishes `ResourceChanged(delete)` after it. With an upstream FHIR server the deletion goes
into the sync outbox (a version-0 deletion row: the worker sends `DELETE ImagingStudy/{id}`
upstream, ADR 0007), because the sync may have mirrored the study there.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.fhir.errors import not_found
from fhir_facade.sync.outbox_queue import OutboxQueue

__all__ = ["StudyDeletion"]


class StudyDeletion:
    """Deletes a study in Orthanc and tells the upstream sync."""

    def __init__(self, orthanc: OrthancRestClient, outbox: OutboxQueue | None = None) -> None:
        self._orthanc = orthanc
        self._outbox = outbox

    async def __call__(self, study_uid: str) -> None:
        """Delete every Orthanc study with this UID; 404 when there is none (nothing was deleted)."""
        ids = await self._orthanc.lookup_study(study_uid)
        deleted = [orthanc_id for orthanc_id in ids if await self._orthanc.delete_study(orthanc_id)]
        if not deleted:
            raise not_found(f"ImagingStudy/{study_uid} is not known")
        if self._outbox is not None:
            await run_in_threadpool(self._outbox.enqueue_deletion, "ImagingStudy", study_uid)
