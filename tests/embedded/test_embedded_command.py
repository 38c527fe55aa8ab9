"""The attacker's probe against `fhir-facade embedded` (the README's run command), as a real process:
its Orthanc must refuse a worklist C-FIND, C-ECHO and C-STORE from an AE title it was not given and
an HTTP request without the facade's credentials, with FACADE_AUTH=smart and =none alike, while the
demo modality (the worklist station AE title on this machine) and the facade keep working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhir_facade.demo import DEMO_STUDY_UID
from fhir_facade.embedded import free_port, stop_process
from tests.dicom_factory import build_study
from tests.embedded.test_pacs_access import assert_rejected, study
from tests.facade_process import wait_for

STATION_AET = "ANY-SCU"  # FACADE_WORKLIST_STATION_AE_TITLE's default: the demo modality
#: Configured, but at an address the probe's connections do not come from.
REMOTE_AET = "CT-REMOTE"


class Embedded:
    def __init__(self, root: Path, auth: str) -> None:
        self.port, self.http_port, self.dicom_port = free_port(), free_port(), free_port()
        self.data_dir = root / "data"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FACADE_")},
            "FACADE_AUTH": auth,
            "FACADE_DATA_DIR": str(self.data_dir),
            "FACADE_PACS_MODALITIES": json.dumps([f"{REMOTE_AET}@127.0.0.2:104"]),
            "FACADE_ANALYZE_ENABLED": "false",
            "FACADE_LOG_LEVEL": "WARNING",
        }

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def dcmtk(self, tool: str, calling_aet: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool, "-aet", calling_aet, "-aec", "ORTHANC", "127.0.0.1", str(self.dicom_port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


@pytest.fixture(params=["smart", "none"])
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Embedded]:
    setup = Embedded(tmp_path, request.param)
    command = [
        sys.executable,
        "-m",
        "fhir_facade",
        "embedded",
        "--port",
        str(setup.port),
        "--orthanc-port",
        str(setup.http_port),
        "--orthanc-dicom-port",
        str(setup.dicom_port),
    ]
    process = subprocess.Popen(command, env=setup.env)
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{setup.port}/fhir/metadata"), timeout=90)
        yield setup
    finally:
        stop_process(process)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_probe_is_refused(embedded: Embedded, tmp_path: Path) -> None:
    worklist = ("-W", "-k", "PatientID", "-k", "AccessionNumber")
    for calling_aet in ("PROBE", REMOTE_AET):
        assert_rejected(embedded.dcmtk("findscu", calling_aet, *worklist))
        assert_rejected(embedded.dcmtk("echoscu", calling_aet))
    dataset = tmp_path / "probe.dcm"
    build_study(study())[0].save_as(dataset, enforce_file_format=True)
    assert_rejected(embedded.dcmtk("storescu", "PROBE", str(dataset)))
    for path in ("/patients", f"/dicom-web/studies/{DEMO_STUDY_UID}/metadata", "/app/explorer.html"):
        assert httpx.get(f"{embedded.orthanc_url}{path}", timeout=10).status_code == 401, path


def test_the_demo_modality_and_the_facade_still_work(embedded: Embedded) -> None:
    done = embedded.dcmtk("findscu", STATION_AET, "-W", "-k", "PatientID")
    assert done.returncode == 0, done.stderr
    assert embedded.dcmtk("echoscu", STATION_AET).returncode == 0
    if embedded.env["FACADE_AUTH"] == "none":  # with smart the facade wants a token: ADR 0008's tests
        study = httpx.get(f"http://127.0.0.1:{embedded.port}/fhir/ImagingStudy/{DEMO_STUDY_UID}", timeout=30)
        assert study.status_code == 200, study.text
