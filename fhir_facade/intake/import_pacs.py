"""The PACS side of `$import`: Orthanc's REST API, synchronous, for the import's worker thread.

Orthanc's `POST /instances` (https://orthanc.uclouvain.be/book/users/rest.html#sending-dicom-files)
answers per file with its id and `Status` "Success" or "AlreadyStored" (it keeps the copy it has);
`DELETE /instances/{id}` takes back what an import stored when its study cannot be stored whole;
the MD5 of a stored file (`/instances/{id}/attachments/dicom/md5`) tells an identical copy from
another instance under the same UID. DICOMweb has neither delete nor such a hash (ADR 0038).

The hot path, `store`, posts over a keep-alive `http.client` connection of its own thread: half
the CPU of an httpx request for a 0.5 MiB instance (0.5 against 1.0 ms, measured for the benchmark
of docs/performance.md), which on 2 cores shared with Orthanc is throughput. The rest is httpx.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

__all__ = ["OrthancStore", "StoreAnswer"]


@dataclass(frozen=True)
class StoreAnswer:
    """`status`: "Success", "AlreadyStored" or "Failed" (then `reason`)."""

    status: str
    pacs_id: str = ""
    reason: str = ""


#: A kept-alive connection idle longer than this is replaced before use: Orthanc's web server
#: (CivetWeb) closes idle ones after a short while, and a POST is not retried blindly.
_IDLE_SECONDS = 0.4


class _Poster:
    """`POST /instances` over one keep-alive connection per thread."""

    def __init__(self, url: str, timeout: float, auth: tuple[str, str] | None) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/instances"
        self._timeout = timeout
        self._headers = {"Content-Type": "application/dicom"}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before (then a failure may be its
        having been closed while idle)."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and time.monotonic() - self._local.used < _IDLE_SECONDS:
            return connection, True
        if connection is not None:
            self._drop(connection)
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=self._timeout)
        self._local.connection = connection
        with self._lock:
            self._all.append(connection)
        return connection, False

    def post(self, content: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            connection, reused = self._connection()
            try:
                connection.request("POST", self._path, body=content, headers=self._headers)
                response = connection.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop(connection)
                if reused and attempt == 1:  # closed by the server while idle: a fresh one once
                    continue
                raise
            except BaseException:
                self._drop(connection)
                raise
            self._local.used = time.monotonic()
            return response.status, body
        raise AssertionError("unreachable")

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._lock:
            if connection in self._all:
                self._all.remove(connection)

    def close(self) -> None:
        with self._lock:
            for connection in self._all:
                connection.close()
            self._all.clear()


class OrthancStore:
    def __init__(
        self, url: str, *, timeout: float, connections: int, auth: tuple[str, str] | None = None
    ) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, limits=limits, auth=auth)
        self._poster = _Poster(url, timeout, auth)

    def close(self) -> None:
        self._client.close()
        self._poster.close()

    def store(self, content: bytes) -> StoreAnswer:
        try:
            code, raw = self._poster.post(content)
        except (OSError, http.client.HTTPException) as error:
            return StoreAnswer("Failed", reason=f"the PACS could not be reached: {type(error).__name__}")
        if code >= 400:
            text = raw[:200].decode("utf-8", "replace")
            return StoreAnswer("Failed", reason=f"the PACS refused it ({code}): {text}")
        try:
            body = json.loads(raw)
        except ValueError:
            return StoreAnswer("Failed", reason="the PACS answered something other than JSON")
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
