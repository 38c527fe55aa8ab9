"""The embedded set-up: a local Orthanc (Debian packages) run by the facade's own commands and tests."""

from fhir_facade.embedded.dicom_peers import DicomPeer, parse_dicom_peer
from fhir_facade.embedded.orthanc import (
    EmbeddedOrthanc,
    OrthancNotInstalled,
    free_port,
    stop_process,
    store_instances,
)

__all__ = [
    "DicomPeer",
    "EmbeddedOrthanc",
    "OrthancNotInstalled",
    "free_port",
    "parse_dicom_peer",
    "stop_process",
    "store_instances",
]
