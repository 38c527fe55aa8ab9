"""The Patient imaging page (issue 18, ADR 0043) in a real browser: patient A's demo study with its
AI result after a real `$analyze` (finding, per-class probabilities, the preliminary machine-made
badge, the saliency map), the radiologist's report status, "Open in viewer"; and a user confined to
patient A who never sees patient B, neither on the page nor through the page's requests."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.conftest import validate
from tests.web_app.conftest import (
    CLINICIAN,
    FHIR_USERS,
    PATIENT_A,
    PATIENT_B,
    RADIOLOGIST,
    STUDY_A,
    STUDY_B,
    WebFacade,
    assert_accessible,
    browser_errors,
    launch_standalone,
    requested_hosts,
    requested_urls,
    screenshot,
    wait_for,
)

NEGATIVE = "281900007"


@pytest.fixture(scope="module")
def web_settings() -> dict[str, Any]:
    """The saliency map on (off by default, ADR 0035), coarse enough for two shared cores, and the
    applicability step off so that patient B's study is the positive result that gets a map."""
    return {
        "analyze_saliency": True,
        "analyze_saliency_patch": 80,
        "analyze_saliency_stride": 40,
        "analyze_slice_applicability": False,
    }


@pytest.fixture(scope="module")
def ai_reports(web_facade: WebFacade) -> dict[str, dict[str, Any]]:
    """Both patients' studies analysed by the real model (saliency map on)."""
    return {study: web_facade.analyze(study) for study in (STUDY_A, STUDY_B)}


def _finding_scores(web_facade: WebFacade, report: dict[str, Any]) -> dict[str, float]:
    with web_facade.system_api() as api:
        for link in report["result"]:
            observation = api.get(link["reference"]).json()
            if any(c["code"] == "121071" for c in observation["code"]["coding"]):
                return {
                    c["code"]["coding"][0]["display"]: c["valueQuantity"]["value"]
                    for c in observation["component"]
                }
    raise AssertionError("no finding Observation")


def _study_item(driver: Any, uid: str) -> Any:
    from selenium.webdriver.common.by import By

    selector = f'.timeline li[data-study-uid="{uid}"]'
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector), 60, "the study is not listed")
    return driver.find_element(By.CSS_SELECTOR, selector)


def test_the_demo_study_with_its_ai_tile(
    web_facade: WebFacade, ai_reports: dict[str, dict[str, Any]], driver: Any
) -> None:
    from selenium.webdriver.common.by import By

    report = ai_reports[STUDY_A]
    validate(report)
    assert report["status"] == "preliminary"
    launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    item = _study_item(driver, STUDY_A)
    tile = item.find_element(By.CSS_SELECTOR, ".ai-tile")
    assert tile.get_attribute("data-report") == report["id"]
    assert "Preliminary · machine-generated" in tile.text
    code = report["conclusionCode"][0]["coding"][0]
    expected = "No finding" if code["code"] == NEGATIVE else "Finding present"
    assert tile.find_element(By.CSS_SELECTOR, ".finding").text == f"{expected} {code['display']}"
    # One row per class, with the model's score, highest first.
    scores = _finding_scores(web_facade, report)
    rows = tile.find_elements(By.CSS_SELECTOR, ".scores tbody tr")
    shown = {
        row.find_element(By.TAG_NAME, "th").text: row.find_element(By.CSS_SELECTOR, ".score").text
        for row in rows
    }
    percents = {label: float(text.removesuffix(" %")) for label, text in shown.items()}
    assert percents.keys() == scores.keys()
    for label, score in scores.items():  # one decimal, as the browser rounds it
        assert abs(percents[label] - score * 100) <= 0.051, (label, percents[label], score)
    assert list(percents.values()) == sorted(percents.values(), reverse=True)
    # The concluded class is the highlighted row.
    assert rows[0].get_attribute("class") == "chosen"
    assert rows[0].find_element(By.TAG_NAME, "th").text == code["display"]
    # A map only for a positive result (ADR 0035); shown when the report has one.
    assert bool(tile.find_elements(By.CSS_SELECTOR, ".saliency img")) == bool(report.get("media"))
    assert "Not reported" in item.find_element(By.CSS_SELECTOR, ".report-status").text
    assert item.find_element(By.CSS_SELECTOR, "button.open-viewer").text == "Open in viewer"
    driver.execute_script("window.scrollTo(0, 0)")
    screenshot(driver, "patient-page")
    assert_accessible(driver)
    assert requested_hosts(driver) == {web_facade.host}
    assert [e for e in browser_errors(driver) if "/favicon.ico" not in e] == []


def test_open_in_viewer_goes_to_the_viewer_with_the_study(
    web_facade: WebFacade, ai_reports: dict[str, dict[str, Any]], driver: Any
) -> None:
    from selenium.webdriver.common.by import By

    launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    _study_item(driver, STUDY_A).find_element(By.CSS_SELECTOR, "button.open-viewer").click()
    wait_for(driver, lambda d: "/viewer/" in d.current_url)
    url = urlsplit(driver.current_url)
    assert f"{url.scheme}://{url.netloc}" == web_facade.root
    assert url.path == "/viewer/viewer"
    assert parse_qs(url.query)["StudyInstanceUIDs"] == [STUDY_A]


def test_a_patient_confined_user_never_sees_patient_b(
    web_facade: WebFacade, ai_reports: dict[str, dict[str, Any]], driver: Any
) -> None:
    """Patient B has a study and an AI result too. The page lists A's only, every request it made
    names A (or a resource of A's), and the page's own token gets nothing of B's: a search for B's
    studies or reports is refused or empty, a read of B's study is a 404."""
    from selenium.webdriver.common.by import By

    ctx = launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    _study_item(driver, STUDY_A)
    items = driver.find_elements(By.CSS_SELECTOR, ".timeline li")
    listed = [li.get_attribute("data-study-uid") for li in items]
    assert listed == [STUDY_A]
    assert STUDY_B not in driver.page_source and PATIENT_B not in driver.page_source
    assert ai_reports[STUDY_B]["id"] not in driver.page_source
    # Asking the page for B's timeline does not fetch it.
    driver.get(f"{web_facade.app_url}/index.html#/patient/{PATIENT_B}")
    wait_for(driver, lambda d: "for one patient only" in d.find_element(By.TAG_NAME, "main").text)
    fhir_requests = [unquote(u) for u in requested_urls(driver) if "/fhir/" in u]
    assert any(f"ImagingStudy?patient={PATIENT_A}" in u for u in fhir_requests)
    assert not [u for u in fhir_requests if PATIENT_B in u or STUDY_B in u]
    # The page's token, used from the page itself.
    answers = driver.execute_async_script(
        """
        const [token, base, patient, study, done] = arguments;
        const get = (path) => fetch(`${base}/${path}`, {headers: {Authorization: `Bearer ${token}`,
          Accept: 'application/fhir+json'}}).then(async (r) => [r.status, await r.json()]);
        Promise.all([get(`ImagingStudy?patient=${patient}`), get(`ImagingStudy/${study}`),
          get(`DiagnosticReport?patient=${patient}`), get('ImagingStudy')]).then(done);
        """,
        ctx["token"],
        web_facade.base_url,
        PATIENT_B,
        STUDY_B,
    )
    (search_status, search), (read_status, _), (reports_status, reports), (all_status, everything) = answers
    assert search_status == 403 or (search_status == 200 and not search.get("entry")), search
    assert read_status == 404
    assert reports_status == 403 or (reports_status == 200 and not reports.get("entry")), reports
    assert all_status == 200
    assert [e["resource"]["id"] for e in everything.get("entry", [])] == [STUDY_A]


def test_a_reader_opens_any_patient_by_id(
    web_facade: WebFacade, ai_reports: dict[str, dict[str, Any]], driver: Any
) -> None:
    """With user/ scopes there is no patient in context: the page asks for one."""
    from selenium.webdriver.common.by import By

    launch_standalone(driver, web_facade, "reader", RADIOLOGIST)
    driver.get(f"{web_facade.app_url}/index.html#/patient")
    field = wait_for(driver, lambda d: d.find_elements(By.ID, "patient-id"))[0]
    field.send_keys(PATIENT_B)
    driver.find_element(By.CSS_SELECTOR, ".patient-chooser button").click()
    item = _study_item(driver, STUDY_B)
    report = ai_reports[STUDY_B]
    tile = item.find_element(By.CSS_SELECTOR, ".ai-tile")
    assert tile.get_attribute("data-report") == report["id"]
    # B's result is the positive one with a saliency map: the report's own PNG, from a data: URL,
    # with a text alternative and the Media's comment as caption.
    assert report["conclusionCode"][0]["coding"][0]["code"] != NEGATIVE and report.get("media")
    assert "Finding present" in tile.find_element(By.CSS_SELECTOR, ".finding").text
    image = tile.find_element(By.CSS_SELECTOR, ".saliency img")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    wait_for(driver, lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
    assert image.get_attribute("alt")
    assert report["media"][0]["comment"] in tile.find_element(By.CSS_SELECTOR, "figcaption").text
    screenshot(driver, "patient-page-positive")
    assert_accessible(driver)


def test_the_signed_report_status(
    web_facade: WebFacade, ai_reports: dict[str, dict[str, Any]], driver: Any
) -> None:
    """A radiologist's signed report of the study shows as signed, with who signed it; the AI tile
    stays (the AI result is not the report)."""
    from selenium.webdriver.common.by import By

    signed = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}], "text": "MR brain"},
        "subject": {"reference": f"Patient/{PATIENT_A}"},
        "imagingStudy": [{"reference": f"ImagingStudy/{STUDY_A}"}],
        "resultsInterpreter": [{"reference": FHIR_USERS[RADIOLOGIST], "display": "Dr Reader"}],
        "conclusion": "No intracranial mass.",
    }
    with web_facade.profile_api(RADIOLOGIST, "reader") as api:
        response = api.post("DiagnosticReport", json=signed)
    assert response.status_code == 201, response.text
    launch_standalone(driver, web_facade, "patient", CLINICIAN, PATIENT_A)
    item = _study_item(driver, STUDY_A)
    status = item.find_element(By.CSS_SELECTOR, ".report-status")
    assert status.get_attribute("data-report") == response.json()["id"]
    assert "Signed · final" in status.text and "Dr Reader" in status.text
    assert "No intracranial mass." in status.text
    tile = item.find_element(By.CSS_SELECTOR, ".ai-tile")
    assert tile.get_attribute("data-report") == ai_reports[STUDY_A]["id"]
    screenshot(driver, "patient-page-signed")
    assert_accessible(driver)
