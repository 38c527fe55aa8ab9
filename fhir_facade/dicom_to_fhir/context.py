"""What the pure mapping needs to know about the deployment, in one immutable value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import tzinfo

__all__ = ["WADO_ENDPOINT_ID", "MappingContext"]

WADO_ENDPOINT_ID = "dicom-wado-rs"
"""Id of the Endpoint that ImagingStudy.endpoint points at (FHIR imagingstudy.html#endpoint)."""


@dataclass(frozen=True)
class MappingContext:
    """Site settings the DICOM -> FHIR mapping depends on, built once from Settings."""

    patient_identifier_system: str
    """Identifier.system for PatientIDs without a usable IssuerOfPatientID (the MRN namespace)."""
    issuer_systems: Mapping[str, str]
    """IssuerOfPatientID -> Identifier.system, for issuers that are local names, not URIs."""
    default_timezone: tzinfo
    """Zone for DICOM times without TimezoneOffsetFromUTC (FHIR needs an offset with a time)."""
    dicomweb_url: str
    """DICOMweb base URL clients are handed, the Endpoint.address: the facade's proxy
    (Settings.dicomweb_link_url, ADR 0016)."""
