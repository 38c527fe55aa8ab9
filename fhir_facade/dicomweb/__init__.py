"""The PACS side: an async DICOMweb (QIDO-RS) client that speaks DICOM JSON, knows nothing of FHIR."""

from fhir_facade.dicomweb.client import (
    DicomJson,
    DicomwebClient,
    DicomwebError,
    DicomwebUnavailable,
)

__all__ = ["DicomJson", "DicomwebClient", "DicomwebError", "DicomwebUnavailable"]
