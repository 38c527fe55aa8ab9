"""Query/retrieve from remote DICOM nodes (the hospital's other PACS), through Orthanc (ADR 0041)."""

from fhir_facade.embedded.remote_nodes import RemoteNode, parse_remote_node
from fhir_facade.remote_pacs.runtime import RemotePacsRuntime

__all__ = ["RemoteNode", "RemotePacsRuntime", "parse_remote_node"]
