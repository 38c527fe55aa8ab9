"""The viewer's browser tests: a live facade with FACADE_AUTH=smart and the built-in authorization
server over a real Orthanc holding the demo brain MR (patient A, analysed by the real model: AI SR
and saliency Parametric Map written back) and a second study of patient B; real tokens from a PKCE
sign-in; Debian's chromium through Debian's chromedriver (headless, 1366x768).

Minimal stand-ins for tests/web_app/conftest.py (branch i18-app): `chrome`, `screenshot` and
`requested_hosts` follow that contract so the tests can move onto its fixtures."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.demo.brain_mri import DEMO_STUDY_UID, upload_demo
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from fhir_facade.web_viewer.router import default_dist_dir
from tests.auth.fixtures.smart_app import pkce_token_response
from tests.conftest import LiveServer, serve
from tests.dicom_factory import demo_brain_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"

APP = "viewer-test-app"
CALLBACK = "http://127.0.0.1:9/viewer-test-callback"  # the code is read off the 302, never followed
USER, PASSWORD = "clinician", "viewer test password"
PATIENT_A = "DEMO-0001"  # the demo study's PatientID
PATIENT_B = "VIEWER-B"
STUDY_A = DEMO_STUDY_UID
STUDY_B = "1.2.826.0.1.3680043.8.498.727.4401"


def _require(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def studies(orthanc: EmbeddedOrthanc) -> EmbeddedOrthanc:
    """Patient A's demo brain MR (24 slices) and patient B's study of 4 slices."""
    _require((default_dist_dir() / "index.html").is_file(), "OHIF dist missing: run scripts/setup.sh")
    with httpx.Client(timeout=60) as client:
        upload_demo(orthanc.url, client=client)
        store_instances(client, orthanc.url, demo_brain_study(STUDY_B, PATIENT_B, 4))
    return orthanc


@pytest.fixture(scope="module")
def viewer_facade(studies: EmbeddedOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("viewer-facade")
    clients_file = data_dir / "clients.json"
    clients_file.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": APP,
                        "name": "viewer test app",
                        "kind": "public",
                        "redirect_uris": [CALLBACK],
                        "scope": "launch/patient openid fhirUser patient/*.rs user/*.rs "
                        "user/DiagnosticReport.c",
                    }
                ],
                "users": [
                    {
                        "username": USER,
                        "password_hash": hash_secret(PASSWORD),
                        "fhirUser": "Practitioner/clinician",
                        "patients": [PATIENT_A, PATIENT_B],
                    }
                ],
            }
        )
    )
    with serve(
        {
            "auth": "smart",
            "dicomweb_url": studies.dicomweb_url,
            "orthanc_url": studies.url,
            "data_dir": data_dir,
            "auth_clients_file": clients_file,
            "analyze_enabled": True,
            "analyze_worklist": False,
            # The demo brain's one positive slice (ADR 0031's table) counts only without the
            # applicability step; a positive finding is what gets a saliency map (ADR 0035).
            "analyze_slice_applicability": False,
            "analyze_saliency": True,
            "analyze_saliency_patch": 80,
            "analyze_saliency_stride": 40,
        }
    ) as server:
        yield server


@dataclass
class Token:
    """A token from the built-in server and the token response fhirclient would keep."""

    access_token: str
    response: dict[str, Any] = field(default_factory=dict)


def sign_in_token(server: LiveServer, scope: str, patient: str | None = None) -> Token:
    """A standalone launch with PKCE, as the SMART app does it: sign in, pick `patient` when the
    scope asks for one, exchange the code at /auth/token."""
    body = pkce_token_response(
        server.base_url,
        client_id=APP,
        redirect_uri=CALLBACK,
        scope=scope,
        username=USER,
        password=PASSWORD,
        patient=patient,
    )
    if patient is not None:
        assert body["patient"] == patient
    return Token(body["access_token"], body)


@pytest.fixture(scope="module")
def reader_token(viewer_facade: LiveServer) -> Token:
    return sign_in_token(viewer_facade, "openid fhirUser user/*.rs user/DiagnosticReport.c")


@pytest.fixture(scope="module")
def patient_a_token(viewer_facade: LiveServer) -> Token:
    return sign_in_token(viewer_facade, "launch/patient openid fhirUser patient/*.rs", patient=PATIENT_A)


@pytest.fixture(scope="module")
def analysed(viewer_facade: LiveServer, reader_token: Token) -> dict[str, Any]:
    """Patient A's study analysed by the real model: the report, with the AI SR and the saliency
    Parametric Map stored in Orthanc over STOW-RS."""
    with httpx.Client(base_url=viewer_facade.base_url, timeout=600) as client:
        response = client.post(
            f"/ImagingStudy/{STUDY_A}/$analyze",
            headers={"Authorization": f"Bearer {reader_token.access_token}"},
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    """Headless Debian chromium at 1366x768 with the performance log (every request and answer)."""
    _require(
        CHROMIUM.exists() and CHROMEDRIVER.exists() and shutil.which("chromium") is not None,
        f"{CHROMIUM} or {CHROMEDRIVER} is missing: run scripts/setup.sh",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # never Selenium Manager's download
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,768"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """A PNG of the window into test-artifacts/browser/ (git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


@dataclass(frozen=True)
class Exchange:
    url: str
    status: int | None  # None: no answer seen (failed or still pending)


def network_log(driver: Any) -> list[Exchange]:
    """Every request the page (and its workers) made since the last call, with the answer's status,
    from Chrome's performance log (reading it empties it)."""
    sent: dict[str, str] = {}
    answered: dict[str, int] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.responseReceived":
            answered[params["requestId"]] = params["response"]["status"]
            sent.setdefault(params["requestId"], params["response"]["url"])
    return [Exchange(url, answered.get(request_id)) for request_id, url in sent.items()]


def requested_hosts(exchanges: list[Exchange]) -> set[str]:
    """The host:port of every network request (data: and blob: URLs are not requests)."""
    return {
        urlsplit(e.url).netloc for e in exchanges if urlsplit(e.url).scheme in ("http", "https", "ws", "wss")
    }


#: JavaScript: the largest share of sampled pixels, over OHIF's viewport canvases, that are not
#: near-black (0 when no viewport shows an image).
LIT_PIXELS = """
let best = 0;
for (const canvas of document.querySelectorAll('canvas.cornerstone-canvas')) {
  if (!canvas.width || !canvas.height) continue;
  const copy = document.createElement('canvas');
  copy.width = canvas.width; copy.height = canvas.height;
  const context = copy.getContext('2d');
  context.drawImage(canvas, 0, 0);
  const data = context.getImageData(0, 0, copy.width, copy.height).data;
  let lit = 0, sampled = 0;
  for (let i = 0; i < data.length; i += 4 * 7) {
    sampled++;
    if (data[i] > 40 || data[i + 1] > 40 || data[i + 2] > 40) lit++;
  }
  best = Math.max(best, lit / sampled);
}
return best;
"""


#: JavaScript: the largest share of sampled pixels, over OHIF's viewport canvases, that are
#: coloured (red and blue channels far apart: the grey MR has none; the saliency segment is yellow).
COLOURED_PIXELS = """
let best = 0;
for (const canvas of document.querySelectorAll('canvas')) {
  if (!canvas.width || !canvas.height || canvas.closest('[data-cy=studyBrowser-panel]')) continue;
  const copy = document.createElement('canvas');
  copy.width = canvas.width; copy.height = canvas.height;
  const context = copy.getContext('2d');
  context.drawImage(canvas, 0, 0);
  const data = context.getImageData(0, 0, copy.width, copy.height).data;
  let coloured = 0, sampled = 0;
  for (let i = 0; i < data.length; i += 4 * 3) {
    sampled++;
    if (data[i] - data[i + 2] > 60 && data[i + 1] - data[i + 2] > 40) coloured++;
  }
  best = Math.max(best, coloured / sampled);
}
return best;
"""
