"""OHIF at /viewer/ in a real browser against the live facade (ADR 0044): with the SMART token
where fhirclient keeps it, the analysed demo study opens, its images render, the AI SR and the
saliency Parametric Map are listed, and every request goes to the facade and is answered 2xx/3xx;
a token confined to patient A opens none of patient B's images; without a token the page sends
the user to the SMART app's launch page."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from fhir_facade.analyze.dicom_sr import COMPREHENSIVE_3D_SR
from fhir_facade.analyze.saliency_dicom import PARAMETRIC_MAP_STORAGE
from tests.conftest import LiveServer
from tests.web_viewer.conftest import (
    APP,
    LIT_PIXELS,
    PATIENT_A,
    STUDY_A,
    STUDY_B,
    Exchange,
    Token,
    network_log,
    requested_hosts,
    screenshot,
)

SR_DESCRIPTION = "AI result (preliminary, unverified)"
MAP_DESCRIPTION = "AI saliency map (preliminary, unverified)"

#: What fhirclient 2.x leaves in sessionStorage after FHIR.oauth2.ready(): SMART_KEY names (as a
#: JSON string) the entry holding its state, whose tokenResponse is the token endpoint's answer.
_PLACE_TOKEN = """
sessionStorage.clear();
if (arguments[0] !== null) {
  sessionStorage.setItem('SMART_KEY', JSON.stringify(arguments[0]));
  sessionStorage.setItem(arguments[0], JSON.stringify(arguments[1]));
}
"""


_STUDY_BROWSER = "return document.querySelector('[data-cy=studyBrowser-panel]')?.textContent || ''"


def _root(server: LiveServer) -> str:
    return server.base_url.removesuffix("/fhir")


def _open(driver: Any, server: LiveServer, token: Token | None, path: str) -> None:
    """Sign the tab in the way the SMART app does (fhirclient's sessionStorage), then open `path`."""
    root = _root(server)
    driver.get(f"{root}/viewer/app-config.js")  # any page of the facade's origin: its sessionStorage
    state = None
    if token is not None:
        state = {
            "serverUrl": server.base_url,
            "clientId": APP,
            "redirectUri": "/app/index.html",
            "scope": token.response.get("scope", ""),
            "key": "viewer-test-state",
            "tokenResponse": token.response,
            "expiresAt": int(time.time()) + int(token.response.get("expires_in", 300)),
        }
    driver.execute_script(_PLACE_TOKEN, "viewer-test-state" if token else None, state)
    network_log(driver)  # drop what the set-up page requested
    driver.get(root + path)


def _wait(condition: Any, timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.5)


def _study_browser_text(driver: Any) -> str:
    return str(driver.execute_script("return document.body.textContent || ''"))


def _facade_only(exchanges: list[Exchange], server: LiveServer) -> None:
    hosts = requested_hosts(exchanges)
    assert hosts == {f"127.0.0.1:{server.port}"}, hosts


def test_the_analysed_study_opens_with_the_token(
    chrome: Any, viewer_facade: LiveServer, reader_token: Token, analysed: dict[str, Any]
) -> None:
    # The analysis wrote the AI SR and (a positive finding) the saliency Parametric Map to the PACS.
    with httpx.Client(base_url=_root(viewer_facade), timeout=30) as client:
        series = client.get(
            f"/dicom-web/studies/{STUDY_A}/instances",
            params={"includefield": "00080016"},
            headers={"Authorization": f"Bearer {reader_token.access_token}"},
        )
        # OHIF lists "other studies of the patient" by PatientID: the reader may see A and B, and
        # the proxy must still answer A's studies only (confinement over a user's list).
        priors = client.get(
            "/dicom-web/studies",
            params={"00100020": PATIENT_A},
            headers={"Authorization": f"Bearer {reader_token.access_token}"},
        )
    assert series.status_code == 200, series.text
    classes = {i["00080016"]["Value"][0] for i in series.json()}
    assert {COMPREHENSIVE_3D_SR, PARAMETRIC_MAP_STORAGE} <= classes, (classes, analysed.get("conclusion"))
    assert [s["0020000D"]["Value"][0] for s in priors.json()] == [STUDY_A]

    _open(chrome, viewer_facade, reader_token, f"/viewer/viewer?StudyInstanceUIDs={STUDY_A}")
    lit = _wait(lambda: chrome.execute_script(LIT_PIXELS) > 0.05, 120, "no viewport canvas shows the brain")
    assert lit
    text = _wait(
        lambda: SR_DESCRIPTION in (t := _study_browser_text(chrome)) and MAP_DESCRIPTION in t and t,
        60,
        "the study browser lists no AI SR or saliency map series",
    )
    panel = str(chrome.execute_script(_STUDY_BROWSER))
    assert panel.count("MRI BRAIN demo (Colin27)") == 1, "another patient's study is listed as a prior"
    assert "MRI BRAIN demo (Colin27)" in text
    time.sleep(3)  # let thumbnails and prefetch finish, so their answers are in the log
    screenshot(chrome, "viewer-demo-study")
    exchanges = network_log(chrome)
    _facade_only(exchanges, viewer_facade)
    failed = [(e.status, e.url) for e in exchanges if e.status is not None and e.status >= 400]
    assert failed == [], failed
    dicomweb = [e for e in exchanges if "/dicom-web/" in e.url]
    assert any("/frames/" in e.url and e.status == 200 for e in dicomweb), "no frame was fetched"
    assert all("token" not in e.url.lower() for e in exchanges), "a token went into a URL"
    refused = [
        entry["message"]
        for entry in chrome.get_log("browser")
        if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]
    ]
    assert refused == [], refused


def test_a_patient_token_opens_none_of_another_patients_images(
    chrome: Any, viewer_facade: LiveServer, patient_a_token: Token
) -> None:
    headers = {"Authorization": f"Bearer {patient_a_token.access_token}"}
    with httpx.Client(base_url=_root(viewer_facade), timeout=30) as client:
        # The proxy refuses B's study to A's token (not visible: 404), and finds it in no search.
        assert client.get(f"/dicom-web/studies/{STUDY_B}/metadata", headers=headers).status_code == 404
        search = client.get("/dicom-web/studies", params={"StudyInstanceUID": STUDY_B}, headers=headers)
        assert (search.status_code, search.json()) == (200, [])
        # The same token does open A's own study.
        assert client.get(f"/dicom-web/studies/{STUDY_A}/metadata", headers=headers).status_code == 200

    _open(chrome, viewer_facade, patient_a_token, f"/viewer/viewer?StudyInstanceUIDs={STUDY_B}")
    time.sleep(15)  # what OHIF would show by now
    assert chrome.execute_script(LIT_PIXELS) < 0.01, "a viewport shows an image of patient B"
    screenshot(chrome, "viewer-other-patient-refused")
    exchanges = network_log(chrome)
    _facade_only(exchanges, viewer_facade)
    dicomweb = [e for e in exchanges if "/dicom-web/" in e.url]
    assert dicomweb, "OHIF asked the proxy nothing"
    leaked = [
        e.url
        for e in dicomweb
        if STUDY_B in e.url and ("/frames/" in e.url or "/metadata" in e.url) and e.status == 200
    ]
    assert leaked == [], leaked


def test_without_a_token_the_viewer_sends_the_user_to_sign_in(chrome: Any, viewer_facade: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    _open(chrome, viewer_facade, None, f"/viewer/viewer?StudyInstanceUIDs={STUDY_A}")
    link = _wait(
        lambda: chrome.find_elements(By.CSS_SELECTOR, "#facade-sign-in a"), 30, "no sign-in message"
    )[0]
    assert link.get_attribute("href") == f"{_root(viewer_facade)}/app/launch.html"
    assert "Sign in" in chrome.find_element(By.CSS_SELECTOR, "#facade-sign-in h1").text
    exchanges = network_log(chrome)
    bundle = re.compile(r"\.bundle\.[0-9a-f]{16}\.js$")
    started = [e.url for e in exchanges if "/dicom-web/" in e.url or bundle.search(e.url)]
    assert started == [], "OHIF started without a token"
