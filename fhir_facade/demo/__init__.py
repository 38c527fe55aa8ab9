"""Demo data: a real brain MRI (the public Colin27 template) as a DICOM study for Orthanc."""

from fhir_facade.demo.brain_mri import (
    COLIN27_PATH,
    DEMO_PATIENT_ID,
    DEMO_SERIES_UID,
    DEMO_STUDY_UID,
    NiftiVolume,
    build_demo_study,
    demo_stored,
    load_colin27,
    png_preview,
    upload_demo,
)

__all__ = [
    "COLIN27_PATH",
    "DEMO_PATIENT_ID",
    "DEMO_SERIES_UID",
    "DEMO_STUDY_UID",
    "NiftiVolume",
    "build_demo_study",
    "demo_stored",
    "load_colin27",
    "png_preview",
    "upload_demo",
]
