"""The PACS side of `$import`: Orthanc's REST API, synchronous, for the import's worker thread.

Orthanc's `POST /instances` (https://orthanc.uclouvain.be/book/users/rest.html#sending-dicom-files)
answers per file with its id and `Status` "Success" or "AlreadyStored" (it keeps the copy it has);
`DELETE /instances/{id}` takes back what an import stored when its study cannot be stored whole;
the MD5 of a stored file (`/instances/{id}/attachments/dicom/md5`) tells an identical copy from
another instance under the same UID. DICOMweb has neither delete nor such a hash (ADR 0038).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import httpx

__all__ = ["OrthancStore", "StoreAnswer"]


@dataclass(frozen=True)
class StoreAnswer:
    """`status`: "Success", "AlreadyStored" or "Failed" (then `reason`)."""

    status: str
    pacs_id: str = ""
    reason: str = ""


class OrthancStore:
    def __init__(
        self, url: str, *, timeout: float, connections: int, auth: tuple[str, str] | None = None
    ) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, limits=limits, auth=auth)

    def close(self) -> None:
        self._client.close()

    def store(self, content: bytes) -> StoreAnswer:
        try:
            response = self._client.post(
                "/instances", content=content, headers={"Content-Type": "application/dicom"}
            )
        except httpx.HTTPError as error:
            return StoreAnswer("Failed", reason=f"the PACS could not be reached: {type(error).__name__}")
        if response.status_code >= 400:
            return StoreAnswer(
                "Failed", reason=f"the PACS refused it ({response.status_code}): {response.text[:200]}"
            )
        body = response.json()
        status = str(body.get("Status", "Success"))
        pacs_id = str(body.get("ID", ""))
        if status == "AlreadyStored" and not self.same_content(pacs_id, content):
            return StoreAnswer(
                "Conflict", pacs_id, "another instance with this SOP Instance UID is in the PACS; it is kept"
            )
        return StoreAnswer(status, pacs_id)

    def same_content(self, pacs_id: str, content: bytes) -> bool:
        response = self._client.get(f"/instances/{pacs_id}/attachments/dicom/md5")
        return response.status_code == 200 and response.text.strip() == hashlib.md5(content).hexdigest()

    def exists(self, pacs_id: str) -> bool:
        try:
            return self._client.get(f"/instances/{pacs_id}").status_code == 200
        except httpx.HTTPError:
            return False

    def delete(self, pacs_id: str) -> bool:
        try:
            return self._client.delete(f"/instances/{pacs_id}").status_code < 400
        except httpx.HTTPError:
            return False
