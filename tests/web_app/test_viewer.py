"""From the SMART app into OHIF (issue 18, ADR 0044): "Open in viewer" on the Patient imaging page
navigates the tab to /viewer/viewer?StudyInstanceUIDs=..., and OHIF reads the token from the state
the app's real fhirclient left in sessionStorage: the study's images render, every request goes to
the facade and none is refused. In the same tab, patient B's study shows no image to a user
confined to patient A (the DICOMweb proxy refuses it)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from tests.web_app.conftest import (
    CLINICIAN,
    PATIENT_A,
    STUDY_A,
    STUDY_B,
    WebFacade,
    assert_accessible,
    launch_standalone,
    requested_hosts,
    requested_urls,
    screenshot,
    wait_for,
)
from tests.web_viewer.conftest import LIT_PIXELS, network_log


def test_open_in_viewer_shows_the_study_with_the_apps_token(web_facade: WebFacade, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    ctx = launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    assert ctx["patientId"] == PATIENT_A
    selector = f'.timeline li[data-study-uid="{STUDY_A}"] button.open-viewer'
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector), 60, "no Open in viewer")
    network_log(driver)  # from here on: the viewer's requests
    driver.find_element(By.CSS_SELECTOR, selector).click()
    wait_for(driver, lambda d: "/viewer/viewer" in d.current_url, 30, "the app did not open the viewer")
    assert "token" not in driver.current_url.lower()
    wait_for(driver, lambda d: d.execute_script(LIT_PIXELS) > 0.05, 120, "no viewport shows the study")
    time.sleep(3)  # thumbnails and prefetch: their answers in the log too
    screenshot(driver, "viewer-from-app")
    # No first-use tour over the image (app-config.js turns OHIF's onboarding off).
    assert "Scrolling Through Images" not in (driver.execute_script("return document.body.innerText") or "")
    exchanges = network_log(driver)
    assert {e.url.split("/")[2] for e in exchanges if e.url.startswith("http")} == {web_facade.host}
    failed = [(e.status, e.url) for e in exchanges if e.status is not None and e.status >= 400]
    assert failed == [], failed
    frames = [e for e in exchanges if f"/dicom-web/studies/{STUDY_A}/" in e.url and "/frames/" in e.url]
    assert frames and all(e.status == 200 for e in frames)

    # The same signed-in tab, patient B's study: the proxy answers nothing of B to A's token.
    driver.get(f"{web_facade.root}/viewer/viewer?StudyInstanceUIDs={STUDY_B}")
    wait_for(
        driver,
        lambda d: "not available" in (d.execute_script("return document.body.textContent") or ""),
        60,
        "OHIF did not say the study is not available",
    )
    assert driver.execute_script(LIT_PIXELS) < 0.01, "a viewport shows an image of patient B"
    leaked = [
        e.url
        for e in network_log(driver)
        if STUDY_B in e.url and ("/frames/" in e.url or "/metadata" in e.url) and e.status == 200
    ]
    assert leaked == [], leaked


def test_without_a_session_the_viewer_links_to_the_apps_launch(web_facade: WebFacade, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{web_facade.root}/viewer/viewer?StudyInstanceUIDs={STUDY_A}")
    message = "#facade-sign-in a"
    link = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, message), 30, "no sign-in message")[0]
    assert driver.find_element(By.CSS_SELECTOR, "main#facade-sign-in h1").text == "Sign in to view images"
    assert_accessible(driver)
    screenshot(driver, "viewer-sign-in")
    assert not [u for u in requested_urls(driver) if "/dicom-web/" in u]
    link.click()
    wait_for(driver, lambda d: urlsplit(d.current_url).path == "/app/launch.html", 30, "no launch page")
    assert requested_hosts(driver) == {web_facade.host}
