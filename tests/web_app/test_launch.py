"""The SMART imaging app's launches (issue 18, ADR 0043) in a real browser against a real facade:
standalone for each profile through the built-in server's sign-in pages, and the EHR launch through
its launcher (ADR 0042); the registration of `imaging-app`; the files' security headers; the session
outliving its access token through the refresh token (online_access, ADR 0047), and sign-out
revoking it. Access tokens live 30 s here (the shortest setting) so that the renewal is seen."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_facade.auth.server.registry import load_registry
from fhir_facade.config import Settings
from fhir_facade.web_app import IMAGING_APP_CLIENT_ID, IMAGING_APP_SCOPE, PROFILE_SCOPES
from fhir_facade.web_app.files import STATIC_DIR
from fhir_facade.web_app.registration import EHR_LAUNCH_SCOPE
from tests.web_app.conftest import (
    ADMIN,
    CLINICIAN,
    FHIR_USERS,
    PATIENT_A,
    PATIENT_B,
    RADIOLOGIST,
    STUDY_A,
    WebFacade,
    assert_accessible,
    browser_errors,
    launch_from_ehr,
    launch_standalone,
    requested_hosts,
    screenshot,
    wait_for,
)

TOKEN_LIFETIME = 30
TOKEN_LEEWAY = 30  # auth.tokens.TokenValidator's


@pytest.fixture(scope="module")
def web_settings() -> dict[str, Any]:
    return {"auth_token_lifetime": TOKEN_LIFETIME}


def test_the_app_is_registered_without_editing_the_registry_file(web_facade: WebFacade) -> None:
    """The file holds only the tests' own users and backend client; imaging-app comes from the
    facade's settings (redirect and launch URLs from FACADE_BASE_URL) and is offered by the EHR
    launcher."""
    on_disk = load_registry(web_facade.registry_file)
    assert on_disk.client(IMAGING_APP_CLIENT_ID) is None
    launcher = httpx.get(f"{web_facade.root}/auth/ehr-launch")
    assert launcher.status_code == 200
    assert f'value="{IMAGING_APP_CLIENT_ID}"' in launcher.text
    # The authorization endpoint knows the client and its redirect URI (a sign-in page, not an error).
    page = httpx.get(
        f"{web_facade.root}/auth/authorize",
        params={
            "response_type": "code",
            "client_id": IMAGING_APP_CLIENT_ID,
            "redirect_uri": f"{web_facade.app_url}/index.html",
            "scope": PROFILE_SCOPES["reader"],
            "state": "s",
            "aud": web_facade.base_url,
            "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "code_challenge_method": "S256",
        },
    )
    assert page.status_code == 200, page.text
    assert 'name="username"' in page.text


def test_each_profile_asks_only_for_registered_scopes() -> None:
    """launch.js holds the same scope sets as registration.py, and each is inside the registration."""
    script = (STATIC_DIR / "launch.js").read_text(encoding="utf-8")
    for profile, scope in PROFILE_SCOPES.items():
        assert f'{profile}: "{scope}"' in script, profile
    assert f'EHR_LAUNCH_SCOPE = "{EHR_LAUNCH_SCOPE}"' in script
    registered = set(IMAGING_APP_SCOPE.split())
    for scope in [*PROFILE_SCOPES.values(), EHR_LAUNCH_SCOPE]:
        assert set(scope.split()) <= registered


def test_every_app_file_carries_the_policy(web_facade: WebFacade) -> None:
    with httpx.Client(base_url=web_facade.app_url, timeout=30) as http:
        for path in (
            "/index.html",
            "/launch.html",
            "/app.js",
            "/style.css",
            "/vendor/fhir-client.min.js",
            "/nothing.js",
        ):
            response = http.get(path)
            assert response.status_code == (404 if path == "/nothing.js" else 200), path
            policy = response.headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
            assert directives["default-src"] == "'none'"
            assert directives["script-src"] == "'self'"
            assert directives["connect-src"] == "'self'"  # the built-in server is the facade itself
            assert response.headers["x-content-type-options"] == "nosniff"
        assert http.get("/app.js").headers["content-type"].startswith("text/javascript")
        # No page names another host, has inline script or inline style (the policy would refuse them).
        for page in STATIC_DIR.glob("*.html"):
            html = page.read_text(encoding="utf-8")
            assert not re.search(r"https?://", html), page.name
            assert "<script>" not in html and "<style" not in html and " style=" not in html, page.name


def test_a_missing_vendor_file_is_a_503_saying_what_to_run(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from fhir_facade.app import create_app

    settings = Settings(
        base_url="http://testserver/fhir",
        data_dir=tmp_path,
        watch_studies=False,
        analyze_enabled=False,
        web_app_vendor_dir=tmp_path / "no-vendor",
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/app/vendor/fhir-client.min.js")
        assert response.status_code == 503
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert "bash scripts/setup.sh run" in body["issue"][0]["diagnostics"]
        assert "content-security-policy" in response.headers
        assert client.get("/app/index.html").status_code == 200


def test_the_app_can_be_switched_off(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from fhir_facade.app import create_app

    settings = Settings(
        base_url="http://127.0.0.1/fhir",
        data_dir=tmp_path,
        watch_studies=False,
        analyze_enabled=False,
        web_app_enabled=False,
        auth="smart",
    )
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/app/index.html").status_code == 404
        launcher = client.get("/auth/ehr-launch")
        assert IMAGING_APP_CLIENT_ID not in launcher.text


def test_an_external_token_endpoint_is_the_one_other_origin_the_app_may_call(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from fhir_facade.app import create_app

    settings = Settings(
        base_url="http://testserver/fhir",
        data_dir=tmp_path,
        watch_studies=False,
        analyze_enabled=False,
        auth="smart",
        auth_issuer="https://login.hospital.example/realms/imaging",
        auth_jwks_url="https://login.hospital.example/realms/imaging/certs",
        auth_token_url="https://login.hospital.example/realms/imaging/token",
        auth_authorize_url="https://login.hospital.example/realms/imaging/auth",
    )
    with TestClient(create_app(settings)) as client:
        policy = client.get("/app/index.html").headers["content-security-policy"]
        assert "connect-src 'self' https://login.hospital.example;" in policy
        discovery = client.get("/fhir/.well-known/smart-configuration").json()
        assert discovery["authorization_endpoint"] == "https://login.hospital.example/realms/imaging/auth"


@pytest.mark.parametrize(
    ("profile", "username", "patient", "page"),
    [
        ("patient", CLINICIAN, PATIENT_A, "patient"),
        ("reader", RADIOLOGIST, None, "worklist"),
        ("admin", ADMIN, None, "upload"),
    ],
)
def test_standalone_launch(
    web_facade: WebFacade, driver: object, profile: str, username: str, patient: str | None, page: str
) -> None:
    """Sign in through the built-in server's real pages; the shell shows the user, the patient in
    context, the pages the granted scopes allow, and asks nothing of another host."""
    from selenium.webdriver.common.by import By

    ctx = launch_standalone(driver, web_facade, profile, username, patient)
    assert ctx["fhirUser"] == FHIR_USERS[username]
    assert ctx["patientId"] == patient
    assert ctx["fhirBase"] == web_facade.base_url
    assert ctx["dicomwebBase"] == "/dicom-web"
    assert "openid" not in ctx["scopes"]  # the built-in server issues no id_token
    if profile == "patient":
        assert "patient/*.rs" in ctx["scopes"] and "launch/patient" in ctx["scopes"]
    else:
        assert not any(s.startswith("patient/") for s in ctx["scopes"])
    menu = [a.get_attribute("data-page") for a in driver.find_elements(By.CSS_SELECTOR, "#nav a[data-page]")]
    assert menu[0] == page
    assert ("patient" in menu) == (profile == "patient")
    assert ("upload" in menu) == (profile == "admin")
    wait_for(driver, lambda d: d.current_url.endswith(f"#/{page}"))
    banner = driver.find_element(By.ID, "banner").text
    assert FHIR_USERS[username] in banner
    if patient:
        wait_for(driver, lambda d: PATIENT_A in d.find_element(By.ID, "banner").text)
    screenshot(driver, f"launch-{profile}")
    assert_accessible(driver)
    assert requested_hosts(driver) == {web_facade.host}
    errors = [e for e in browser_errors(driver) if "/favicon.ico" not in e]  # the sign-in pages' favicon
    missing = f"/app/pages/{page}.js"  # a page another branch delivers: "not available" until then
    assert [e for e in errors if missing not in e] == [], errors


def test_ehr_launch(web_facade: WebFacade, driver: object) -> None:
    """The built-in EHR launcher starts the app for patient A; the app asks for `launch` and gets
    the patient from the launch context, without a patient choice."""
    ctx = launch_from_ehr(driver, web_facade, CLINICIAN, PATIENT_A)
    assert ctx["patientId"] == PATIENT_A
    assert ctx["fhirUser"] == FHIR_USERS[CLINICIAN]
    assert "launch" in ctx["scopes"] and "patient/*.rs" in ctx["scopes"]
    screenshot(driver, "launch-ehr")
    assert requested_hosts(driver) == {web_facade.host}


def test_the_shell_without_a_session_offers_sign_in(web_facade: WebFacade, driver: object) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{web_facade.app_url}/index.html")
    wait_for(driver, lambda d: "Not signed in" in d.find_element(By.TAG_NAME, "main").text)
    link = driver.find_element(By.CSS_SELECTOR, "main a.button")
    link.click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#profiles a.button"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#profiles a.button")) == 3
    assert_accessible(driver)
    screenshot(driver, "launch-choice")


def test_sign_out_forgets_the_session(web_facade: WebFacade, driver: object) -> None:
    from selenium.webdriver.common.by import By

    launch_standalone(driver, web_facade, "reader", RADIOLOGIST)
    driver.find_element(By.ID, "sign-out").click()
    wait_for(driver, lambda d: "/app/launch.html" in d.current_url)
    assert json.loads(driver.execute_script("return JSON.stringify(Object.keys(sessionStorage))")) == []
    driver.get(f"{web_facade.app_url}/index.html")
    wait_for(driver, lambda d: "Not signed in" in d.find_element(By.TAG_NAME, "main").text)


def test_a_facade_without_smart_says_how_to_turn_it_on(driver: object, tmp_path: Path) -> None:
    """With FACADE_AUTH=none there is no authorization server to sign in at: the app says so
    instead of showing an empty shell."""
    from selenium.webdriver.common.by import By

    from tests.conftest import serve

    with serve({"dicomweb_url": "http://127.0.0.1:9/dicom-web", "data_dir": tmp_path}) as server:
        root = server.base_url.removesuffix("/fhir")
        driver.get(f"{root}/app/launch.html?profile=patient")
        wait_for(
            driver, lambda d: "FACADE_AUTH=smart" in d.execute_script("return document.body.innerText"), 30
        )
        screenshot(driver, "launch-without-smart")
        assert not driver.find_elements(By.CSS_SELECTOR, "#nav a")
        assert not driver.find_element(By.ID, "sign-out").is_displayed()


def _session(driver: Any) -> dict[str, Any]:
    """fhirclient's saved state of this tab's session (sessionStorage, under SMART_KEY)."""
    state: dict[str, Any] = driver.execute_script(
        "return JSON.parse(sessionStorage.getItem(JSON.parse(sessionStorage.getItem('SMART_KEY'))))"
    )
    return state


def test_the_session_outlives_the_access_token(web_facade: WebFacade, driver: Any) -> None:
    """online_access brings a refresh token; the shell renews the access token before it expires, and
    the page keeps reading through client.request and through plain fetch with ctx.token after the
    first access token has expired."""
    ctx = launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    assert "online_access" in ctx["scopes"]
    first = _session(driver)["tokenResponse"]
    assert first["refresh_token"] and first["expires_in"] == TOKEN_LIFETIME
    bearer = {"Authorization": f"Bearer {first['access_token']}"}

    renewed = wait_for(
        driver,
        lambda d: d.execute_script("return window.imagingApp.ctx.token") != first["access_token"],
        TOKEN_LIFETIME + 15,
        "the shell did not renew the access token",
    )
    assert renewed
    # Until the resource server refuses the first token (exp plus its 30 s leeway for clock skew):
    # by then the shell has renewed the token twice.
    dead_at = json.loads(_jwt_payload(first["access_token"]))["exp"] + TOKEN_LEEWAY + 1
    time.sleep(max(0.0, dead_at - time.time()))
    expired = httpx.get(f"{web_facade.base_url}/Patient/{PATIENT_A}", headers=bearer, timeout=30)
    assert expired.status_code == 401  # the first access token is dead; the session is not

    driver.set_script_timeout(30)
    through_client = driver.execute_async_script(
        """
        const [patient, done] = arguments;
        window.imagingApp.ctx.client.request(`Patient/${patient}`)
          .then((p) => done(p.id), (e) => done(`error: ${e.message || e}`));
        """,
        PATIENT_A,
    )
    assert through_client == PATIENT_A
    statuses = driver.execute_async_script(
        """
        const [base, patients, done] = arguments;
        const ctx = window.imagingApp.ctx;
        Promise.all(patients.map((p) =>
          fetch(`${base}/Patient/${p}`, {headers: {Authorization: `Bearer ${ctx.token}`}})
            .then((r) => r.status)
        )).then(done, (e) => done(String(e)));
        """,
        web_facade.base_url,
        [PATIENT_A, PATIENT_B],
    )
    assert statuses == [200, 404]  # renewed, and still confined to the launch patient
    state = _session(driver)["tokenResponse"]
    assert state["refresh_token"] != first["refresh_token"]  # rotated, and saved for the viewer
    assert state["patient"] == PATIENT_A
    assert requested_hosts(driver) == {web_facade.host}
    # No request failed but the favicon of the sign-in pages and the other patient's (404 above).
    errors = [
        e for e in browser_errors(driver) if "/favicon.ico" not in e and f"/Patient/{PATIENT_B}" not in e
    ]
    assert errors == [], errors


def _jwt_payload(token: str) -> str:
    import base64

    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def test_sign_out_revokes_the_refresh_token(web_facade: WebFacade, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    launch_standalone(driver, web_facade, "reader", RADIOLOGIST)
    refresh_token = _session(driver)["tokenResponse"]["refresh_token"]
    driver.find_element(By.ID, "sign-out").click()
    wait_for(driver, lambda d: "/app/launch.html" in d.current_url)
    answer = httpx.post(
        f"{web_facade.root}/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": IMAGING_APP_CLIENT_ID,
        },
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant", answer.text


def test_the_viewer_renews_the_token_while_it_is_open(web_facade: WebFacade, driver: Any) -> None:
    """OHIF at /viewer runs without the app's shell: its app-config.js renews the access token with
    the refresh token before it expires and writes it back into fhirclient's state, where OHIF's
    requests (and the app, back in this tab) read it."""
    from selenium.webdriver.common.by import By

    launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    selector = f'.timeline li[data-study-uid="{STUDY_A}"] button.open-viewer'
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector), 60, "no Open in viewer")
    driver.find_element(By.CSS_SELECTOR, selector).click()
    wait_for(driver, lambda d: "/viewer/viewer" in d.current_url, 30, "the app did not open the viewer")
    opened = _session(driver)["tokenResponse"]
    wait_for(
        driver,
        lambda d: _session(d)["tokenResponse"]["access_token"] != opened["access_token"],
        TOKEN_LIFETIME + 15,
        "the viewer did not renew the access token",
    )
    renewed = _session(driver)["tokenResponse"]
    assert renewed["refresh_token"] != opened["refresh_token"]  # rotated (ADR 0047)
    assert renewed["patient"] == PATIENT_A
    driver.set_script_timeout(30)
    status = driver.execute_async_script(
        """
        const [token, done] = arguments;
        fetch('/dicom-web/studies', {headers: {Authorization: `Bearer ${token}`}})
          .then((r) => done(r.status), (e) => done(String(e)));
        """,
        renewed["access_token"],
    )
    assert status == 200
    assert requested_hosts(driver) == {web_facade.host}
