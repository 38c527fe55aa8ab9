"""A DICOMweb proxy under the facade (DICOM PS3.18 QIDO-RS, WADO-RS, STOW-RS at /dicom-web) that
applies the caller's SMART scopes and patient confinement, so an app or viewer reaches the images
with the same bearer token it uses for FHIR."""

from fhir_facade.dicomweb_proxy.client import DicomwebProxyClient
from fhir_facade.dicomweb_proxy.router import build_dicomweb_proxy_router

__all__ = ["DicomwebProxyClient", "build_dicomweb_proxy_router"]
