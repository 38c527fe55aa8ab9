"""ServiceRequest -> DICOM Modality Worklist (PS3.4 Annex K): items as `.wl` files for Orthanc's
ModalityWorklists plugin, kept in step with each order's status."""

from fhir_facade.worklist.folder import SyncResult, WorklistFolder, sync_service_request
from fhir_facade.worklist.mwl_item import (
    DCM_SYSTEM,
    DEFAULT_STATION_AE_TITLE,
    MODALITY_WORKLIST_FIND,
    WorklistMappingError,
    is_imaging_order,
    worklist_item,
)

__all__ = [
    "DCM_SYSTEM",
    "DEFAULT_STATION_AE_TITLE",
    "MODALITY_WORKLIST_FIND",
    "SyncResult",
    "WorklistFolder",
    "WorklistMappingError",
    "is_imaging_order",
    "sync_service_request",
    "worklist_item",
]
