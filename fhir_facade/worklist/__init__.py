"""ServiceRequest -> DICOM Modality Worklist (PS3.4 Annex K): items as `.wl` files for Orthanc's
ModalityWorklists plugin, kept in step with each order's status."""

from fhir_facade.worklist.folder import SyncResult, WorklistFolder, is_schedulable, sync_service_request
from fhir_facade.worklist.mwl_item import (
    DCM_SYSTEM,
    DEFAULT_STATION_AE_TITLE,
    MODALITY_WORKLIST_FIND,
    ModalityNotDerived,
    RequestedProcedure,
    WorklistMappingError,
    check_stations,
    is_imaging_order,
    requested_procedure,
    worklist_item,
)
from fhir_facade.worklist.procedures import (
    CatalogueEntry,
    ProcedureCatalogue,
    ProcedureMapError,
    bundled_catalogue,
    load_concept_maps,
)

__all__ = [
    "DCM_SYSTEM",
    "DEFAULT_STATION_AE_TITLE",
    "MODALITY_WORKLIST_FIND",
    "CatalogueEntry",
    "ModalityNotDerived",
    "ProcedureCatalogue",
    "ProcedureMapError",
    "RequestedProcedure",
    "SyncResult",
    "WorklistFolder",
    "WorklistMappingError",
    "bundled_catalogue",
    "check_stations",
    "is_imaging_order",
    "is_schedulable",
    "load_concept_maps",
    "requested_procedure",
    "sync_service_request",
    "worklist_item",
]
