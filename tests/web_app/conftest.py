"""Browser tests of the SMART imaging app at /app (issue 18, ADR 0043): shared fixtures.

Each test module gets its own real Orthanc (the demo brain MRI of patient A = DEMO-0001, and a
study of patient B built from the same Colin27 slices) and its own facade with FACADE_AUTH=smart,
the built-in authorization server (registry file below; the app's client `imaging-app` is the
facade's own registration, not in the file), the real model for `$analyze`, and
the app served from the repository's .web-vendor. Nothing is analysed until a test says so
(`WebFacade.analyze`; the change feed is not watched). Browsers are Debian's chromium through Debian's
chromedriver, headless at 1366x768, with Chrome's performance log on so that every request the page
made can be checked (`requested_urls`, `requested_hosts`).

Users (password `PASSWORD`):
- `clinician`: Practitioner/clinician-a, may open patient A only (a patient-confined user);
- `radiologist`: Practitioner/radiologist-1, every patient (a reading room);
- `admin`: Practitioner/admin-1, every patient (uploads);
- the backend client `web-test-system` (system/*.cruds) for the tests' own set-up (`system_api`).

A test module changes the facade's settings by overriding the `web_settings` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from joserfc.jwk import RSAKey

from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.config import REPO_WEB_VENDOR
from fhir_facade.demo.brain_mri import DEMO_PATIENT_ID, DEMO_STUDY_UID, build_demo_study
from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from fhir_facade.web_app import IMAGING_APP_CLIENT_ID, PROFILE_SCOPES
from tests.auth.fixtures.smart_app import (
    ASSERTION_TYPE,
    client_assertion,
    pkce_token_response,
)
from tests.conftest import LiveServer, serve
from tests.dicom_factory import demo_brain_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
AXE = REPO_WEB_VENDOR / "axe-core" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
WINDOW = (1366, 768)

PATIENT_A, STUDY_A = DEMO_PATIENT_ID, DEMO_STUDY_UID
PATIENT_B, STUDY_B = "WEBAPP-B", "1.2.826.0.1.3680043.8.498.727.1802"
PASSWORD = "web app test password"
CLINICIAN, RADIOLOGIST, ADMIN = "clinician", "radiologist", "admin"
FHIR_USERS = {
    CLINICIAN: "Practitioner/clinician-a",
    RADIOLOGIST: "Practitioner/radiologist-1",
    ADMIN: "Practitioner/admin-1",
}
SYSTEM_CLIENT = "web-test-system"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


class WebFacade:
    """The facade under test and the ways to its tokens."""

    def __init__(self, server: LiveServer, system_key: RSAKey, registry_file: Path) -> None:
        self.server = server
        self.base_url = server.base_url
        self.root = server.base_url.removesuffix("/fhir")
        self.app_url = f"{self.root}/app"
        self.registry_file = registry_file
        self._system_key = system_key

    @property
    def host(self) -> str:
        return urlsplit(self.root).netloc

    def user_token(self, username: str, scope: str, patient: str | None = None) -> dict[str, Any]:
        """Sign `username` in as the app would (authorization code + PKCE with client imaging-app,
        without a browser) and return the token response."""
        return pkce_token_response(
            self.base_url,
            client_id=IMAGING_APP_CLIENT_ID,
            redirect_uri=f"{self.app_url}/index.html",
            scope=scope,
            username=username,
            password=PASSWORD,
            patient=patient,
        )

    def profile_api(self, username: str, profile: str, patient: str | None = None) -> httpx.Client:
        """An httpx client on the FHIR base with the token the app gets for `profile`."""
        token = self.user_token(username, PROFILE_SCOPES[profile], patient)["access_token"]
        return self._client(token)

    def system_api(self, scope: str = "system/*.cruds") -> httpx.Client:
        """An httpx client on the FHIR base with a SMART Backend Services token (the tests' set-up)."""
        token_url = f"{self.root}/auth/token"
        with httpx.Client(timeout=30) as http:
            response = http.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": scope,
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": client_assertion(self._system_key, SYSTEM_CLIENT, token_url),
                },
            )
        assert response.status_code == 200, response.text
        return self._client(response.json()["access_token"])

    def _client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=300,
            headers={**FHIR_JSON, "Authorization": f"Bearer {token}"},
        )

    def analyze(self, study_uid: str = STUDY_A) -> dict[str, Any]:
        """Run `$analyze` on a study (synchronously, the real model) as the system client; returns
        the DiagnosticReport."""
        with self.system_api() as api:
            response = api.post(f"ImagingStudy/{study_uid}/$analyze")
        assert response.status_code in (200, 201), response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def web_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    """A real Orthanc with patient A's demo study and patient B's study."""
    instance = EmbeddedOrthanc(
        tmp_path_factory.mktemp("web-orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=2,
        http_auth=False,
    )
    with instance:
        with httpx.Client(timeout=60) as http:
            store_instances(http, instance.url, build_demo_study(24))
            # The 8 slices tests/analyze/test_saliency_operation.py uses: with the applicability step
            # off the model calls the skull-base slice "meningioma", the one positive result the
            # project's images give (a module that wants it sets analyze_slice_applicability=False).
            store_instances(http, instance.url, demo_brain_study(STUDY_B, PATIENT_B, 8))
        yield instance


@pytest.fixture(scope="module")
def web_settings() -> dict[str, Any]:
    """Settings of the module's facade beyond the fixed ones (the product's defaults otherwise);
    override in a test module."""
    return {}


@pytest.fixture(scope="module")
def web_facade(
    web_orthanc: EmbeddedOrthanc, web_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebFacade]:
    folder = tmp_path_factory.mktemp("web-facade")
    system_key = RSAKey.generate_key(2048, parameters={"kid": "web-test-1"}, private=True)
    password = hash_secret(PASSWORD)
    registry = {
        "clients": [
            {
                "client_id": SYSTEM_CLIENT,
                "kind": "backend-service",
                "scope": "system/*.cruds",
                "jwks": {"keys": [system_key.as_dict(private=False)]},
            }
        ],
        "users": [
            {
                "username": CLINICIAN,
                "password_hash": password,
                "fhirUser": FHIR_USERS[CLINICIAN],
                "patients": [PATIENT_A],
            },
            {
                "username": RADIOLOGIST,
                "password_hash": password,
                "fhirUser": FHIR_USERS[RADIOLOGIST],
                "all_patients": True,
            },
            {
                "username": ADMIN,
                "password_hash": password,
                "fhirUser": FHIR_USERS[ADMIN],
                "all_patients": True,
            },
        ],
    }
    registry_file = folder / "auth-clients.json"
    registry_file.write_text(json.dumps(registry))
    settings = {
        "auth": "smart",
        "auth_clients_file": registry_file,
        "data_dir": folder,
        "dicomweb_url": web_orthanc.dicomweb_url,
        "orthanc_url": web_orthanc.url,
        "analyze_enabled": True,
        "web_app_vendor_dir": REPO_WEB_VENDOR,
        **web_settings,
    }
    with serve(settings, port=free_port()) as server:
        yield WebFacade(server, system_key, registry_file)


# -- the browser -----------------------------------------------------------------------------------


@pytest.fixture
def driver() -> Iterator[Any]:
    """Headless Debian chromium at 1366x768 with the performance log (every request) on."""
    _need(
        CHROMIUM.exists() and CHROMEDRIVER.exists() and shutil.which("chromium") is not None,
        f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `bash scripts/setup.sh test`",
    )
    _need(
        (REPO_WEB_VENDOR / "fhirclient" / "build" / "fhir-client.min.js").is_file(),
        "the app's browser packages are missing: run `python3 scripts/install_web_vendor.py test`",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # never Selenium Manager's download
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",  # no update checks, no safe-browsing lists
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_window_size(*WINDOW)
    browser._requested_urls = []  # filled from the performance log by requested_urls()
    try:
        yield browser
    finally:
        browser.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser asked for since the driver started (documents, scripts, fetches),
    from Chrome's performance log (Network.requestWillBeSent)."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            driver._requested_urls.append(message["params"]["request"]["url"])
    return list(driver._requested_urls)


def requested_hosts(driver: Any) -> set[str]:
    """The host:port of every network request the browser made (data: and blob: URLs are no
    requests to a host and are left out)."""
    hosts = set()
    for url in requested_urls(driver):
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about", "chrome", "devtools"):
            continue
        hosts.add(parts.netloc)
    return hosts


def browser_errors(driver: Any) -> list[str]:
    """SEVERE console entries and CSP refusals since the last call."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]
    ]


def screenshot(driver: Any, name: str) -> Path:
    """Save a PNG of the window to test-artifacts/browser/<name>.png (git-ignored; CI keeps it)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def assert_accessible(driver: Any, *, context: str | None = None) -> list[dict[str, Any]]:
    """Run axe-core (WCAG 2.x A and AA rules) on the current page; fail on serious or critical
    violations, naming each rule and element. Returns all violations (minor/moderate ones too)."""
    _need(AXE.is_file(), f"{AXE} is missing: run `python3 scripts/install_web_vendor.py test`")
    if not driver.execute_script("return typeof window.axe !== 'undefined'"):
        driver.execute_script(AXE.read_text(encoding="utf-8"))
    driver.set_script_timeout(60)
    result = driver.execute_async_script(
        """
        const [selector, done] = arguments;
        const tags = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'];
        window.axe
          .run(selector || document, {runOnly: {type: 'tag', values: tags}})
          .then((r) => done(r.violations), (e) => done({error: String(e)}));
        """,
        context,
    )
    assert not (isinstance(result, dict) and "error" in result), result
    serious = [v for v in result if v.get("impact") in ("serious", "critical")]
    assert serious == [], "\n".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}" for v in serious
    )
    violations: list[dict[str, Any]] = result
    return violations


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 30, message: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message)


def _fill_sign_in(driver: Any, username: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(driver, lambda d: d.find_elements(By.ID, "username"), message="no sign-in form")
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, 'button[type="submit"]:not([value="deny"])').click()


def _choose_patient(driver: Any, patient: str | None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    if patient is None:
        return
    wait_for(driver, lambda d: d.find_elements(By.ID, "patient") or "/app/" in d.current_url)
    if driver.find_elements(By.ID, "patient"):
        Select(driver.find_element(By.ID, "patient")).select_by_value(patient)
        driver.find_element(By.CSS_SELECTOR, 'button[type="submit"]:not([value="deny"])').click()


def wait_for_shell(driver: Any, timeout: float = 30) -> dict[str, Any]:
    """Wait until the shell finished the sign-in; returns what the pages get as ctx (minus the
    client and the functions)."""
    wait_for(
        driver,
        lambda d: d.execute_script("return Boolean(window.imagingApp && window.imagingApp.ctx)"),
        timeout,
        f"the shell did not sign in (at {driver.current_url})",
    )
    ctx: dict[str, Any] = driver.execute_script(
        "const c = window.imagingApp.ctx; return {fhirBase: c.fhirBase, dicomwebBase: c.dicomwebBase, "
        "token: c.token, patientId: c.patientId, fhirUser: c.fhirUser, scopes: c.scopes};"
    )
    return ctx


def launch_standalone(
    driver: Any, facade: WebFacade, profile: str, username: str, patient: str | None = None
) -> dict[str, Any]:
    """A standalone launch through the built-in server's real pages: open /app/launch.html?profile=,
    sign in, pick the patient (patient profile), land in the shell. Returns the page context."""
    driver.get(f"{facade.app_url}/launch.html?profile={profile}")
    _fill_sign_in(driver, username)
    _choose_patient(driver, patient if profile == "patient" else None)
    return wait_for_shell(driver)


def launch_from_ehr(driver: Any, facade: WebFacade, username: str, patient: str) -> dict[str, Any]:
    """An EHR launch (ADR 0042): sign in at /auth/ehr-launch, choose the app and the patient; the
    launcher opens /app/launch.html?iss=&launch=, the app goes to /auth/authorize (sign in again: the
    built-in server keeps no session) and lands in the shell. Returns the page context."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(f"{facade.root}/auth/ehr-launch")
    wait_for(driver, lambda d: d.find_elements(By.ID, "client_id"))
    Select(driver.find_element(By.ID, "client_id")).select_by_value(IMAGING_APP_CLIENT_ID)
    _fill_sign_in(driver, username)
    _choose_patient(driver, patient)
    _fill_sign_in(driver, username)
    return wait_for_shell(driver)
