"""The remote DICOM nodes the facade may query and retrieve from: `NAME=AET@ip[:port]` entries of
FACADE_REMOTE_PACS_NODES (ADR 0041).

Only these names can be addressed: a request names a node, never a host or port, so the facade
cannot be pointed at an arbitrary address (SSRF). Each node is also an Orthanc `DicomModalities`
entry of the same name: Orthanc is the SCU that queries it (C-FIND) and asks it to send a study
(C-MOVE), and the SCP that receives the study (C-STORE from the node's AE title and address).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fhir_facade.embedded.dicom_peers import DicomPeer, parse_dicom_peer

__all__ = ["REMOTE_ENDPOINT_PREFIX", "RemoteNode", "parse_remote_node"]

#: Endpoint ids of remote nodes: this prefix and the node name (the local ones are dicom-*).
REMOTE_ENDPOINT_PREFIX = "remote-pacs-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,40}")


@dataclass(frozen=True)
class RemoteNode:
    """One remote DICOM node: its name (in requests, in Orthanc and in the Endpoint id) and peer."""

    name: str
    peer: DicomPeer

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"remote node name {self.name!r} must be 1-41 letters, digits or '-'")

    @property
    def endpoint_id(self) -> str:
        return REMOTE_ENDPOINT_PREFIX + self.name

    def orthanc_modality(self) -> dict[str, Any]:
        """The embedded Orthanc's `DicomModalities` entry: Orthanc queries and moves from it as SCU;
        as SCP it only takes the node's C-STORE (the retrieved study) and C-ECHO, never its queries
        or retrieves of our archive (ADR 0013)."""
        return {
            "AET": self.peer.aet,
            "Host": self.peer.host,
            "Port": self.peer.port,
            "AllowEcho": True,
            "AllowStore": True,
            "AllowFind": False,
            "AllowFindWorklist": False,
            "AllowGet": False,
            "AllowMove": False,
            "AllowStorageCommitment": False,
        }


def parse_remote_node(entry: str) -> RemoteNode:
    """`PACS2=PACS2AE@10.0.0.7:104` -> RemoteNode (the port defaults to 104)."""
    name, sep, peer = entry.strip().partition("=")
    if not sep:
        raise ValueError(f"{entry!r} is not NAME=AET@ip-address[:port]")
    return RemoteNode(name.strip(), parse_dicom_peer(peer))
