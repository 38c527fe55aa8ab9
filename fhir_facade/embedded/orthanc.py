"""Start and stop a local Orthanc with the DICOMweb plugin, from the Debian `orthanc` and
`orthanc-dicomweb` packages, on chosen ports with its own storage folder.

Used by `fhir-facade embedded` (the README's run command) and by the test session, so both talk
to the same kind of real PACS that production runs.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
from pydicom.dataset import FileDataset

from fhir_facade.embedded.dicom_peers import DicomPeer
from fhir_facade.embedded.remote_nodes import RemoteNode

__all__ = ["EmbeddedOrthanc", "OrthancNotInstalled", "free_port", "store_instances"]

log = logging.getLogger(__name__)

#: The Orthanc user the facade signs in as (HTTP Basic, RFC 7617); its password is generated.
FACADE_USER = "fhir-facade"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
WORKLIST_PLUGIN = "libModalityWorklists.so"


class OrthancNotInstalled(RuntimeError):
    """The Orthanc binary or its DICOMweb plugin is missing (install the Debian packages)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; waits for the end."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def store_instances(client: httpx.Client, orthanc_url: str, datasets: Iterable[FileDataset]) -> None:
    """Store datasets through Orthanc's REST `POST /instances`; raise on any refusal.

    Orthanc answers 200 with Status "Success" or "AlreadyStored" (re-uploads are not errors), and
    an HTTP error or another Status when it rejects a file.
    """
    base = orthanc_url.rstrip("/")
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        response = client.post(
            f"{base}/instances", content=buffer.getvalue(), headers={"Content-Type": "application/dicom"}
        )
        response.raise_for_status()
        status = response.json().get("Status")
        if status not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {ds.SOPInstanceUID}: {response.text}")


def _die_with_parent() -> None:
    """Child-side: have the kernel send SIGTERM to Orthanc when the facade dies, whatever kills it
    (uvicorn re-raises SIGINT/SIGTERM after its shutdown, which skips Python cleanup)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _find_plugin(name: str) -> Path:
    for folder in PLUGIN_DIRS:
        candidates = sorted(folder.glob(name + "*"))
        if candidates:
            return candidates[0]
    raise OrthancNotInstalled(
        f"{name} not found in {', '.join(map(str, PLUGIN_DIRS))}: apt-get install orthanc-dicomweb"
    )


class EmbeddedOrthanc:
    """A child Orthanc process that serves only the facade and the listed modalities.

    Orthanc 1.10 (Debian) listens on every interface and has no bind-address option, so access is
    refused inside Orthanc instead (docs/adr/0013-embedded-pacs-access.md):
    - HTTP (REST, DICOMweb): only from 127.0.0.1 (`RemoteAccessAllowed: false`) and, unless
      `http_auth=False`, only with the generated credentials (`credentials`, `auth`, `client()`):
      a local user or a web page the browser was tricked into calling has neither.
    - DICOM: only the `modalities` AE titles, each from its own IP address, and each only for what a
      modality does (DicomPeer.orthanc_modality); every `DicomAlwaysAllow*` is off and the called
      AE title must be ours.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        http_port: int = 8042,
        dicom_port: int = 4242,
        aet: str = "ORTHANC",
        stable_age: int = 60,
        extra_config: dict[str, Any] | None = None,
        worklist_dir: Path | None = None,
        modalities: Sequence[DicomPeer] = (),
        http_auth: bool = True,
        remote_nodes: Sequence[RemoteNode] = (),
    ) -> None:
        self.workdir = workdir
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = aet
        self.stable_age = stable_age
        self.extra_config = extra_config or {}
        self.worklist_dir = worklist_dir
        self.modalities = tuple(modalities)
        #: Remote PACS to query and retrieve from, by their own names (ADR 0041).
        self.remote_nodes = tuple(remote_nodes)
        #: (user, password) for HTTP Basic, generated for this object; None when HTTP
        #: authentication is off (tests that only need a loopback-only Orthanc).
        self.credentials: tuple[str, str] | None = (
            (FACADE_USER, secrets.token_urlsafe(32)) if http_auth else None
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """The Orthanc process's id while it runs (the benchmarks read its CPU time)."""
        return self._process.pid if self._process is not None else None

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> httpx.BasicAuth | None:
        """What an httpx client sends to be let in (None: Orthanc asks for nothing)."""
        return httpx.BasicAuth(*self.credentials) if self.credentials else None

    def client(self, *, timeout: float = 30.0) -> httpx.Client:
        """A synchronous client of this Orthanc carrying its credentials (for uploads and checks)."""
        return httpx.Client(auth=self.auth, timeout=timeout)

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        config: dict[str, Any] = {
            "Name": "fhir-facade-embedded",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            # Orthanc 1.10 binds both ports to every interface (it has no bind-address option):
            # a request from any address but 127.0.0.1 is answered 401 here.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.credentials is not None,
            "RegisteredUsers": dict([self.credentials]) if self.credentials else {},
            "ExecuteLuaEnabled": False,
            # DICOM: no anonymous peers. Orthanc's defaults admit any AE title to C-ECHO and C-STORE.
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomCheckCalledAet": True,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {
                **{f"modality-{n}": peer.orthanc_modality() for n, peer in enumerate(self.modalities, 1)},
                **{node.name: node.orthanc_modality() for node in self.remote_nodes},
            },
            "StableAge": self.stable_age,
            # QIDO answers are encoded with DefaultEncoding: with the Latin-1 default Orthanc drops
            # the ideographic and phonetic groups of UTF-8 names (checked with Japanese PNs).
            "DefaultEncoding": "Utf8",
            "Plugins": [str(_find_plugin(DICOMWEB_PLUGIN))],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "Host": f"127.0.0.1:{self.http_port}",
                "Ssl": False,
            },
        }
        if self.worklist_dir is not None:
            # Modality Worklist SCP (DICOM PS3.4 K) from a folder of .wl files, answered to the
            # listed modalities only (their AllowFindWorklist).
            config["Plugins"].append(str(_find_plugin(WORKLIST_PLUGIN)))
            config["Worklists"] = {"Enable": True, "Database": str(self.worklist_dir)}
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = 30.0) -> EmbeddedOrthanc:
        binary = shutil.which("Orthanc") or shutil.which("orthanc")
        if binary is None:
            raise OrthancNotInstalled("Orthanc not found on PATH: apt-get install orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        # The file holds the password: readable by this user only, also when it exists already.
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as config_file:
            json.dump(self.config(), config_file, indent=2)
        log_file = self._log = (self.workdir / "orthanc.log").open("ab")
        self._process = subprocess.Popen(
            [binary, str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._process.returncode}; see {self.workdir / 'orthanc.log'}"
                )
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=1.0).status_code == 200:
                    log.info("Orthanc ready at %s (data in %s)", self.url, self.workdir)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not start within {timeout} s; see {self.workdir / 'orthanc.log'}")

    def stop(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._process is None:
            return
        stop_process(self._process)
        self._process = None

    def __enter__(self) -> EmbeddedOrthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
