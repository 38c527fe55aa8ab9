"""The DICOM peers (modalities) the embedded Orthanc accepts: `AET@host[:port]` entries of
FACADE_PACS_MODALITIES, turned into Orthanc `DicomModalities` entries.

A DICOM association carries no credential: the SCP knows its peer only by the calling AE title
(PS3.8 9.3.2, A-ASSOCIATE-RQ) and the TCP source address. Orthanc admits a listed AE title only from
its listed address when `DicomCheckModalityHost` is on, which it compares literally with the peer's
IP address: hence an IP address here, not a host name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_DICOM_PORT", "DicomPeer", "parse_dicom_peer"]

#: The well-known DICOM port (PS3.8 C.2); Orthanc needs one for each modality, used only when it
#: connects to the peer itself (C-MOVE destination), never for admitting it.
DEFAULT_DICOM_PORT = 104

# AE title: 1-16 characters of the default repertoire, no backslash or control characters, not
# only spaces (PS3.5 6.2, VR AE).
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_ENTRY = re.compile(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:\[\]]+)(?::(?P<port>\d{1,5}))?")


@dataclass(frozen=True)
class DicomPeer:
    """One modality: its calling AE title, its IP address and its DICOM port."""

    aet: str
    host: str
    port: int = DEFAULT_DICOM_PORT

    def __post_init__(self) -> None:
        if not _AE_TITLE.fullmatch(self.aet) or not self.aet.strip():
            raise ValueError(f"aet {self.aet!r} is not a DICOM AE title (PS3.5 6.2: 1-16 characters)")
        try:
            ipaddress.ip_address(self.host)
        except ValueError as exc:
            raise ValueError(
                f"host {self.host!r} is not an IP address (Orthanc compares the peer's address literally)"
            ) from exc
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")

    def orthanc_modality(self) -> dict[str, Any]:
        """The `DicomModalities` entry: what a modality does and nothing more. It may verify the
        connection (C-ECHO), query its worklist (C-FIND, PS3.4 K) and send the images it acquired
        (C-STORE); querying or retrieving the archive (C-FIND/C-GET/C-MOVE on studies) would hand
        every patient's images to whoever can use this AE title from this address."""
        return {
            "AET": self.aet,
            "Host": self.host,
            "Port": self.port,
            "AllowEcho": True,
            "AllowFindWorklist": True,
            "AllowStore": True,
            "AllowFind": False,
            "AllowGet": False,
            "AllowMove": False,
            "AllowStorageCommitment": False,
        }


def parse_dicom_peer(entry: str) -> DicomPeer:
    """`CT01@10.0.0.5:104` (port optional, default 104; an IPv6 address in brackets) -> DicomPeer."""
    match = _ENTRY.fullmatch(entry.strip())
    if match is None:
        raise ValueError(f"{entry!r} is not AET@ip-address[:port]")
    port = match["port"]
    return DicomPeer(match["aet"], match["host"].strip("[]"), int(port) if port else DEFAULT_DICOM_PORT)
