"""fhir-facade: a FHIR R4 gateway to medical imaging over DICOMweb."""

__all__ = ["__version__"]

__version__ = "0.1.0"
