"""OHIF at /viewer/ in a real browser against the live facade (ADR 0044): with the SMART token
where fhirclient keeps it, the analysed demo study opens, its images render, the AI SR, the
saliency Parametric Map and its region's Segmentation are listed, the Segmentation overlays its
key image, and every request goes to the facade and is answered 2xx/3xx; a token confined to
patient A opens none of patient B's images; without a token the page sends the user to the SMART
app's launch page."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from fhir_facade.analyze.dicom_sr import COMPREHENSIVE_3D_SR
from fhir_facade.analyze.saliency_dicom import PARAMETRIC_MAP_STORAGE
from fhir_facade.analyze.saliency_seg import SEGMENT_LABEL, SEGMENTATION_STORAGE
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


DEMO_DESCRIPTION = "MRI BRAIN demo (Colin27)"  # StudyDescription of A's and B's studies


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
            params={"00100020": PATIENT_A, "includefield": "00081030"},
            headers={"Authorization": f"Bearer {reader_token.access_token}"},
        )
    assert series.status_code == 200, series.text
    classes = {i["00080016"]["Value"][0] for i in series.json()}
    expected = {COMPREHENSIVE_3D_SR, PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE}
    assert expected <= classes, (classes, analysed.get("conclusion"))
    # The Orthanc is the session's: other modules may have stored more studies of patient A (the
    # demo patient), so the answer is judged by patient, not by count.
    found = priors.json()
    uids = [s["0020000D"]["Value"][0] for s in found]
    assert STUDY_A in uids and STUDY_B not in uids, uids
    assert {s["00100020"]["Value"][0] for s in found} == {PATIENT_A}
    demo_studies = sum(1 for s in found if s.get("00081030", {}).get("Value") == [DEMO_DESCRIPTION])

    _open(chrome, viewer_facade, reader_token, f"/viewer/viewer?StudyInstanceUIDs={STUDY_A}")
    lit = _wait(lambda: chrome.execute_script(LIT_PIXELS) > 0.05, 120, "no viewport canvas shows the brain")
    assert lit
    text = _wait(
        lambda: SR_DESCRIPTION in (t := _study_browser_text(chrome)) and MAP_DESCRIPTION in t and t,
        60,
        "the study browser lists no AI SR or saliency map series",
    )
    panel = str(chrome.execute_script(_STUDY_BROWSER))
    # Patient B's study has the same description: the panel lists exactly patient A's ones.
    assert panel.count(DEMO_DESCRIPTION) == demo_studies, "another patient's study is listed as a prior"
    assert DEMO_DESCRIPTION in text
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


REGION_DESCRIPTION = "AI saliency region (preliminary, unverified)"

#: JavaScript: the study browser's thumbnail (OHIF's Thumbnail: data-cy study-browser-thumbnail
#: or study-browser-thumbnail-no-image) whose text holds arguments[0].
_THUMBNAIL = """
for (const element of document.querySelectorAll('[data-cy^=study-browser-thumbnail]')) {
  if ((element.textContent || '').includes(arguments[0])) return element;
}
return null;
"""

#: What OHIF may ask before it shows a Segmentation (the tour; "open this Segmentation?"; the
#: viewport's load button): the buttons clicked, in this order, while waiting for the overlay.
_ANSWERS = ("Yes", "LOAD", "Load")


def test_the_saliency_region_segmentation_overlays_its_key_image(
    chrome: Any, viewer_facade: LiveServer, reader_token: Token, analysed: dict[str, Any]
) -> None:
    """The Segmentation of the map's top region (ADR 0035) is listed as a SEG series; opened
    (double-click, then OHIF's "open this Segmentation?" answered), OHIF lays it over the key image:
    coloured pixels appear in the viewport and the segmentation panel names the segment."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from tests.web_viewer.conftest import COLOURED_PIXELS

    _open(chrome, viewer_facade, reader_token, f"/viewer/viewer?StudyInstanceUIDs={STUDY_A}")
    _wait(lambda: chrome.execute_script(LIT_PIXELS) > 0.05, 120, "no viewport canvas shows the brain")
    _wait(lambda: REGION_DESCRIPTION in _study_browser_text(chrome), 60, "no SEG series is listed")
    time.sleep(2)
    before = float(chrome.execute_script(COLOURED_PIXELS))
    assert before < 0.001, before
    answered: list[str] = []
    opened: list[float] = []

    def coloured_or_answer_prompt() -> float:
        # OHIF's first-use tour (once per browser) covers the page: skip it, then open the SEG
        # (again every 20 s, should a double-click land while OHIF was busy).
        if not opened or (time.monotonic() - opened[-1] > 20 and not answered):
            for button in chrome.find_elements(By.XPATH, "//button[normalize-space()='Skip all']"):
                if button.is_displayed():
                    button.click()
                    time.sleep(1)
            thumbnail = chrome.execute_script(_THUMBNAIL, REGION_DESCRIPTION)
            assert thumbnail is not None
            ActionChains(chrome).double_click(thumbnail).perform()
            opened.append(time.monotonic())
            time.sleep(2)
            screenshot(chrome, "viewer-seg-after-double-click")
        for answer in _ANSWERS:
            for button in chrome.find_elements(
                By.XPATH, f"//*[self::button or @role='button'][normalize-space()='{answer}']"
            ):
                if button.is_displayed():
                    answered.append(answer)
                    button.click()
        share = float(chrome.execute_script(COLOURED_PIXELS))
        return share if share > 0.001 else 0.0

    try:
        coloured = _wait(coloured_or_answer_prompt, 90, f"no coloured segment over the image ({answered})")
    finally:
        screenshot(chrome, "viewer-saliency-region-seg-wait")
    time.sleep(2)
    screenshot(chrome, "viewer-saliency-region-seg")
    assert 0.001 < coloured < 0.2, "a region of the image, not the whole viewport"
    # OHIF went to the key image (the one the SEG references), not the slice shown before.
    assert "I:24 (1/24)" not in _study_browser_text(chrome)
    # The right-hand segmentation panel (its tab button: data-cy "<panel name>-btn") names the segment.
    tabs = chrome.find_elements(By.CSS_SELECTOR, "[data-cy^=panelSegmentation][data-cy$=-btn]")
    if tabs and SEGMENT_LABEL not in _study_browser_text(chrome):
        tabs[0].click()
    _wait(lambda: SEGMENT_LABEL in _study_browser_text(chrome), 20, "no segmentation panel lists the segment")
    screenshot(chrome, "viewer-saliency-region-seg-panel")
    exchanges = network_log(chrome)
    _facade_only(exchanges, viewer_facade)
    failed = [(e.status, e.url) for e in exchanges if e.status is not None and e.status >= 400]
    assert failed == [], failed
    errors = [
        entry["message"]
        for entry in chrome.get_log("browser")
        if entry["level"] == "SEVERE"
        and ("seg" in entry["message"].lower() or "RangeError" in entry["message"])
    ]
    assert errors == [], errors
