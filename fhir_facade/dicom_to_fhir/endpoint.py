"""The DICOMweb Endpoints of the PACS (FHIR endpoint.html; R4 imagingstudy.html#endpoint), addressed
as clients reach them: the facade's DICOMweb proxy unless configured otherwise (ADR 0016)."""

from __future__ import annotations

from typing import Any

from fhir_facade.dicom_to_fhir.context import WADO_ENDPOINT_ID, MappingContext
from fhir_facade.fhir.narrative import Facts, Paragraph, narrative, with_narrative

__all__ = ["ENDPOINT_IDS", "endpoint", "endpoints"]

_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
_PAYLOAD_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"

# id -> (name, payload MIME types). The ids are the endpoint-connection-type codes.
_SERVICES: dict[str, tuple[str, list[str]]] = {
    WADO_ENDPOINT_ID: ("DICOMweb WADO-RS (retrieve)", ["application/dicom"]),
    "dicom-qido-rs": ("DICOMweb QIDO-RS (query)", ["application/dicom+json"]),
    "dicom-stow-rs": ("DICOMweb STOW-RS (store)", ["application/dicom"]),
}
ENDPOINT_IDS: tuple[str, ...] = tuple(_SERVICES)


def endpoint(endpoint_id: str, ctx: MappingContext) -> dict[str, Any] | None:
    """One DICOMweb Endpoint by id, or None for an unknown id.

    payloadType is 1..* in R4; its example code system has only "any"/"none", and "any" is true
    of DICOMweb (every SOP class), with the service named in text.
    """
    service = _SERVICES.get(endpoint_id)
    if service is None:
        return None
    name, mime_types = service
    resource = {
        "resourceType": "Endpoint",
        "id": endpoint_id,
        "status": "active",
        "connectionType": {"system": _CONNECTION_TYPE, "code": endpoint_id},
        "name": name,
        "payloadType": [
            {
                "coding": [{"system": _PAYLOAD_TYPE, "code": "any", "display": "Any"}],
                "text": "DICOM",
            }
        ],
        "payloadMimeType": list(mime_types),
        "address": ctx.dicomweb_url.rstrip("/"),
    }
    return with_narrative(
        resource,
        narrative(
            Paragraph(f"{name} of the PACS at {resource['address']}."),
            Facts(
                [
                    ("Connection type", endpoint_id),
                    ("Address", resource["address"]),
                    ("Payload", ", ".join(mime_types)),
                    ("Status", "active"),
                ]
            ),
        ),
    )


def endpoints(ctx: MappingContext) -> list[dict[str, Any]]:
    """The WADO-RS, QIDO-RS and STOW-RS Endpoints, all at the context's DICOMweb base."""
    return [resource for id_ in ENDPOINT_IDS if (resource := endpoint(id_, ctx)) is not None]
