"""The Endpoint of a remote DICOM node: where a remote study lives (ADR 0041)."""

from __future__ import annotations

from typing import Any

from fhir_facade.embedded.remote_nodes import RemoteNode
from fhir_facade.fhir.narrative import Facts, Paragraph, narrative, with_narrative

__all__ = ["DIMSE_CONNECTION_TYPE", "node_endpoint"]

#: R4's endpoint-connection-type CodeSystem has DICOMweb codes only (dicom-wado-rs, dicom-qido-rs,
#: dicom-stow-rs, dicom-wado-uri); the binding is extensible, so DIMSE gets our own code.
DIMSE_CONNECTION_TYPE = {
    "system": "http://fhir-facade.org/fhir/CodeSystem/endpoint-connection-type",
    "code": "dicom-dimse",
    "display": "DICOM DIMSE (C-FIND, C-MOVE)",
}
_PAYLOAD_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"


def node_endpoint(node: RemoteNode) -> dict[str, Any]:
    """The Endpoint a remote study's `endpoint` names: where it lives (R4 Endpoint; address a
    `dicom://` URL of the node's DIMSE service, payloadType "any" as the local ones)."""
    address = f"dicom://{node.peer.aet}@{node.peer.host}:{node.peer.port}"
    resource: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": node.endpoint_id,
        "status": "active",
        "connectionType": dict(DIMSE_CONNECTION_TYPE),
        "name": f"Remote DICOM node {node.name}",
        "payloadType": [
            {"coding": [{"system": _PAYLOAD_TYPE, "code": "any", "display": "Any"}], "text": "DICOM"}
        ],
        "address": address,
    }
    return with_narrative(
        resource,
        narrative(
            Paragraph(
                f"Remote DICOM node {node.name}: query with $query-remote, retrieve with $retrieve-remote."
            ),
            Facts([("AE title", node.peer.aet), ("Address", address), ("Status", "active")]),
        ),
    )
