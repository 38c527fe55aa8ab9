"""The reading worklist page (issue 18 on the workflow of ADR 0033/0034) in real browsers against a
real facade, Orthanc and model:

the ward orders the demo MR (its accession number) -> `$analyze` runs the shipped model -> a reading
Task -> the radiologist (standalone launch, profile=reader) sees it triaged, with the AI finding,
and claims it -> a second practitioner's browser, still showing it unclaimed, tries to claim it and
gets the clear "someone else claimed it first" message -> the radiologist writes the report
(sections, conclusion, conclusion code, disagreement with the AI, critical result), saves a draft,
signs -> checked through the FHIR API: the DiagnosticReport final with its sections and
interpreter, the Task completed, the agreement recorded, the Communication to the ordering
practitioner -> the page shows it awaiting acknowledgement, then escalated (a short
FACADE_READING_CRITICAL_ACK_TIMEOUT), then acknowledged. Screenshots in test-artifacts/browser/,
axe-core without serious or critical violations, no request to any host but the facade.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.reading.agreement import AGREEMENT_EXTENSION, AI_ASSESSMENT
from fhir_facade.reading.codes import TASK_CODE_SYSTEM
from fhir_facade.reading.critical import INTERPRETATION
from tests.conftest import validate
from tests.web_app.conftest import (
    ADMIN,
    CHROMEDRIVER,
    CHROMIUM,
    CLINICIAN,
    FHIR_USERS,
    PATIENT_A,
    PATIENT_B,
    RADIOLOGIST,
    STUDY_A,
    STUDY_B,
    WINDOW,
    WebFacade,
    assert_accessible,
    browser_errors,
    launch_standalone,
    requested_hosts,
    screenshot,
    wait_for,
)

READ = f"{TASK_CODE_SYSTEM}|read"
FOLLOW_UP = f"{TASK_CODE_SYSTEM}|critical-result-follow-up"
ALERT = "http://terminology.hl7.org/CodeSystem/communication-category|alert"
ORDERING = "Practitioner/clinician-a"
ACK_TIMEOUT = 12.0
_ARGUMENTS = (  # the conftest's `driver`: no network of its own, no update checks
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)
SECTIONS = {
    "technique": ("55111-9", "Axial T1-weighted MR of the brain, 24 slices."),
    "comparison": ("18834-2", "No prior imaging in this archive."),
    "findings": ("59776-5", "Extra-axial mass at the left convexity, 3 cm, with mass effect."),
    "impression": ("19005-8", "Left convexity meningioma with mass effect: urgent neurosurgical review."),
}
TYPED_AFTER_EXPIRY = " in this archive."  # the end of the comparison, typed once the token expired
CONCLUSION = "Probable left convexity meningioma with mass effect."
MENINGIOMA = ("http://snomed.info/sct", "302820008")


@pytest.fixture(scope="module")
def web_settings() -> dict[str, Any]:
    """No saliency map (this page does not show it; half the analysis time), a short
    acknowledgement timeout so the escalation shows within the test."""
    return {
        "analyze_saliency": False,
        "reading_critical_ack_timeout": ACK_TIMEOUT,
        "reading_critical_check_interval": 0.5,
    }


def _found(api: httpx.Client, resource_type: str, **params: str) -> list[dict[str, Any]]:
    response = api.get(resource_type, params=params)
    assert response.status_code == 200, response.text
    entries = response.json().get("entry", [])
    return [e["resource"] for e in entries if e.get("search", {}).get("mode") != "include"]


@pytest.fixture(scope="module")
def reading_task(web_facade: WebFacade) -> dict[str, Any]:
    """The ward's order for the demo study (matched by accession number), the real model's result,
    and the reading Task the facade made of it."""
    with web_facade.system_api() as api:
        order = api.post(
            "ServiceRequest",
            json={
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "identifier": [{"system": "urn:oid:1.2.3.4.1802", "value": "DEMO-ACC-1"}],
                "code": {"text": "MR brain"},
                "subject": {"reference": f"Patient/{PATIENT_A}"},
                "requester": {"reference": ORDERING, "display": "Dr Clinician"},
            },
        )
        assert order.status_code == 201, order.text
        ai_report = web_facade.analyze(STUDY_A)
        (task,) = _found(api, "Task", code=READ, focus=f"ImagingStudy/{STUDY_A}")
        # Patient B's study: a person raised its read to ASAP (the triage rules never set asap).
        asap = api.post(
            "Task",
            json={
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "priority": "asap",
                "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "read"}]},
                "focus": {"reference": f"ImagingStudy/{STUDY_B}"},
                "for": {"reference": f"Patient/{PATIENT_B}"},
                "authoredOn": task["authoredOn"],
                "note": [{"text": "Ward round at 9: please read first."}],
            },
        )
        assert asap.status_code == 201, asap.text
    validate(task)
    assert task["status"] == "requested" and task["priority"] == "routine", task
    assert task["input"][0]["valueReference"] == {"reference": f"DiagnosticReport/{ai_report['id']}"}
    assert task["basedOn"] == [{"reference": f"ServiceRequest/{order.json()['id']}"}]
    return {"task": task, "ai_report": ai_report, "order": order.json(), "asap": asap.json()}


@pytest.fixture
def second_driver(driver: Any) -> Iterator[Any]:
    """A second browser set up like the conftest's `driver` (its capabilities, Debian chromium and
    chromedriver, headless at 1366x768, performance log on)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*_ARGUMENTS, f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_window_size(*WINDOW)
    browser._requested_urls = []
    try:
        yield browser
    finally:
        browser.quit()


def _by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _row(driver: Any, body: str, task_id: str) -> Any:
    rows = _by_css(driver, f'#{body} tr[data-task-id="{task_id}"]')
    return rows[0] if rows else None


def _open_worklist(driver: Any, facade: WebFacade, username: str) -> None:
    ctx = launch_standalone(driver, facade, "reader", username)
    assert ctx["fhirUser"] == FHIR_USERS[username]
    if not driver.execute_script("return location.hash").startswith("#/worklist"):
        driver.execute_script("location.hash = '#/worklist'")
    wait_for(driver, lambda d: _by_css(d, "#wl-waiting-rows tr"), message="the worklist did not render")


def _alert_text(driver: Any) -> str:
    (alert,) = _by_css(driver, "#wl-alert")
    return str(alert.text)


def _click(driver: Any, body: str, task_id: str, button: str) -> None:
    _row(driver, body, task_id).find_element("css selector", f"button.{button}").click()


def _see_the_triaged_tasks(browser: Any, task_id: str, asap_id: str) -> None:
    row = wait_for(browser, lambda d: _row(d, "wl-waiting-rows", task_id), message="no reading Task row")
    text = row.text
    assert "Routine" in text, text  # the priority in words, not only a colour
    assert "No abnormality detected" in text and "AI, not reviewed" in text, text
    assert "Colin Demo" in text and STUDY_A in text, text
    link = row.find_element("css selector", "a.wl-patient")  # the patient page: priors to compare
    assert link.get_attribute("href").endswith(f"#/patient/{PATIENT_A}")
    order = [r.get_attribute("data-task-id") for r in _by_css(browser, "#wl-waiting-rows tr")]
    assert order == [asap_id, task_id], "ASAP before routine"
    other = _row(browser, "wl-waiting-rows", asap_id).text
    assert "ASAP" in other and "No AI result yet" in other and "Ward round at 9" in other, other


def _claim_and_lose_the_race(facade: WebFacade, radiologist: Any, colleague: Any, task_id: str) -> None:
    """The radiologist claims; the colleague, whose page still shows the Task unclaimed, is told
    that someone else was first, and their list is refreshed (the study is gone from it)."""
    _click(radiologist, "wl-waiting-rows", task_id, "wl-claim")
    wait_for(radiologist, lambda d: _row(d, "wl-mine-rows", task_id), message="the claim did not show")
    with facade.system_api() as api:
        claimed = api.get(f"Task/{task_id}").json()
    assert claimed["status"] == "in-progress" and claimed["owner"] == {"reference": FHIR_USERS[RADIOLOGIST]}

    _click(colleague, "wl-waiting-rows", task_id, "wl-claim")
    wait_for(colleague, lambda d: "claimed this study first" in _alert_text(d), message="no conflict message")
    wait_for(colleague, lambda d: _row(d, "wl-waiting-rows", task_id) is None, message="no refreshed list")
    assert "refreshed" in _alert_text(colleague)
    screenshot(colleague, "worklist-claim-conflict")
    assert_accessible(colleague)
    with facade.system_api() as api:
        assert api.get(f"Task/{task_id}").json()["owner"] == {"reference": FHIR_USERS[RADIOLOGIST]}


def _release_and_claim_again(facade: WebFacade, radiologist: Any, task_id: str) -> None:
    """Released, the Task is back in the worklist without owner; claimed again, it is theirs."""
    _click(radiologist, "wl-mine-rows", task_id, "wl-release")
    wait_for(radiologist, lambda d: _row(d, "wl-waiting-rows", task_id), message="the release did not show")
    with facade.system_api() as api:
        released = api.get(f"Task/{task_id}").json()
    assert released["status"] == "requested" and "owner" not in released
    focused = wait_for(  # the focus moves once the lists are redrawn
        radiologist,
        lambda d: (
            "wl-claim" in (d.switch_to.active_element.get_attribute("class") or "").split()
            and d.switch_to.active_element
        ),
        message="the focus is not on the row's Claim button",
    )
    focused.click()
    wait_for(radiologist, lambda d: _row(d, "wl-mine-rows", task_id), message="the second claim did not show")


def _write_a_draft(facade: WebFacade, radiologist: Any, task_id: str) -> dict[str, Any]:
    """Sections, conclusion, a conclusion code of the model's classes, disagreement with the AI
    ("no abnormality"), critical; saved as a draft (preliminary). Returns the draft."""
    from selenium.webdriver.support.ui import Select

    _click(radiologist, "wl-mine-rows", task_id, "wl-write")
    wait_for(radiologist, lambda d: _by_css(d, "#wl-report-form"), message="no report form")
    assert "preliminary, machine-generated" in _by_css(radiologist, "#wl-report")[0].text
    for name, (_, text) in SECTIONS.items():
        _by_css(radiologist, f"#wl-{name}")[0].send_keys(text.removesuffix(TYPED_AFTER_EXPIRY))
    _by_css(radiologist, "#wl-conclusion")[0].send_keys(CONCLUSION)
    Select(_by_css(radiologist, "#wl-conclusion-code")[0]).select_by_value("|".join(MENINGIOMA))
    _by_css(radiologist, "label[for='wl-agreement-disagree']")[0].click()
    _by_css(radiologist, "label[for='wl-critical']")[0].click()
    _by_css(radiologist, "#wl-save")[0].click()
    saved = "Draft saved"
    wait_for(radiologist, lambda d: saved in _by_css(d, "#wl-report-status")[0].text, message="no draft")
    with facade.system_api() as api:
        preliminary = _found(api, "DiagnosticReport", patient=PATIENT_A, status="preliminary")
        (draft,) = [r for r in preliminary if r.get("resultsInterpreter")]  # the other one: the AI's
        assert draft["resultsInterpreter"] == [{"reference": FHIR_USERS[RADIOLOGIST]}]
        assert draft["extension"] == [{"url": AGREEMENT_EXTENSION, "valueCode": "disagree"}]
        assert api.get(f"Task/{task_id}").json()["status"] == "in-progress", "a draft completes nothing"
    radiologist.execute_script("document.getElementById('wl-report').scrollIntoView()")
    screenshot(radiologist, "worklist-report-draft")
    assert_accessible(radiologist)

    # Closed and opened again, the form holds the saved draft.
    _by_css(radiologist, "#wl-close")[0].click()
    _click(radiologist, "wl-mine-rows", task_id, "wl-write")
    impression = SECTIONS["impression"][1]
    wait_for(
        radiologist,
        lambda d: [e.get_attribute("value") for e in _by_css(d, "#wl-impression")] == [impression],
        message="the draft was not loaded again",
    )
    assert _by_css(radiologist, "#wl-critical")[0].is_selected()
    assert _by_css(radiologist, "#wl-agreement-disagree")[0].is_selected()
    assert _by_css(radiologist, "#wl-conclusion-code")[0].get_attribute("value") == "|".join(MENINGIOMA)
    return draft


def _sign_in_expires_while_writing(facade: WebFacade, radiologist: Any, task_id: str) -> None:
    """The app's token is short-lived (300 s with the built-in server, no refresh token): a refused
    signature says so and links to a new sign-in; what was typed comes back in the form."""
    radiologist.execute_script(
        "window.imagingApp.ctx.client.state.tokenResponse.access_token = 'expired.token.value'"
    )
    _by_css(radiologist, "#wl-comparison")[0].send_keys(TYPED_AFTER_EXPIRY)
    _by_css(radiologist, "#wl-sign")[0].click()
    alert = wait_for(
        radiologist,
        lambda d: [e for e in _by_css(d, "#wl-report-alert") if "sign-in has expired" in e.text],
        message="no expiry message",
    )[0]
    assert "kept in this browser tab" in alert.text
    assert (
        alert.find_element("css selector", "a")
        .get_attribute("href")
        .endswith("/app/launch.html?profile=reader")
    )

    _open_worklist(radiologist, facade, RADIOLOGIST)  # a new sign-in in the same tab
    wait_for(radiologist, lambda d: _row(d, "wl-mine-rows", task_id), message="no claimed row")
    _click(radiologist, "wl-mine-rows", task_id, "wl-write")
    comparison = SECTIONS["comparison"][1]
    wait_for(
        radiologist,
        lambda d: [e.get_attribute("value") for e in _by_css(d, "#wl-comparison")] == [comparison],
        message="what was typed did not come back",
    )
    assert "restored what you typed" in _by_css(radiologist, "#wl-report")[0].text
    with facade.system_api() as api:
        assert api.get(f"Task/{task_id}").json()["status"] == "in-progress", "nothing was signed"


def _check_the_signed_report(
    api: httpx.Client, report_id: str, order_id: str, task_id: str
) -> dict[str, Any]:
    """Through the FHIR API: the report final with its sections and interpreter, the Task
    completed by it, the agreement recorded, the Communication to the ordering practitioner.
    Returns the Communication."""
    report = api.get(f"DiagnosticReport/{report_id}").json()
    validate(report)
    assert report["status"] == "final"
    assert report["resultsInterpreter"] == [{"reference": FHIR_USERS[RADIOLOGIST]}]
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{STUDY_A}"}]
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]
    sections = {c["id"]: c for c in report["contained"]}
    assert {k: (s["code"]["coding"][0]["code"], s["valueString"]) for k, s in sections.items()} == SECTIONS
    assert report["result"] == [{"reference": f"#{k}"} for k in SECTIONS]
    flag = {"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}
    assert sections["impression"]["interpretation"][0]["coding"] == [flag]
    assert report["conclusion"] == CONCLUSION
    coding = report["conclusionCode"][0]["coding"][0]
    assert (coding["system"], coding["code"]) == MENINGIOMA
    assert report["extension"] == [{"url": AGREEMENT_EXTENSION, "valueCode": "disagree"}]
    assert any(f["contentType"] == "application/pdf" for f in report["presentedForm"])

    task = api.get(f"Task/{task_id}").json()
    validate(task)
    assert task["status"] == "completed"
    assert task["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{report_id}"}

    agreement = f"{AI_ASSESSMENT}|ai-agreement"
    (assessment,) = _found(api, "Observation", code=agreement, focus=f"DiagnosticReport/{report_id}")
    assert assessment["valueCodeableConcept"]["coding"][0]["code"] == "disagree"

    (alert,) = _found(api, "Communication", category=ALERT, patient=PATIENT_A)
    validate(alert)
    assert alert["status"] == "in-progress" and alert["priority"] == "stat"
    assert alert["recipient"] == [{"reference": ORDERING, "display": "Dr Clinician"}]
    assert alert["sender"] == {"reference": FHIR_USERS[RADIOLOGIST]}
    assert alert["about"] == [{"reference": f"DiagnosticReport/{report_id}"}]
    return alert


def _acknowledgement(browser: Any, communication_id: str) -> str | None:
    rows = _by_css(browser, f'#wl-critical-rows tr[data-communication-id="{communication_id}"]')
    return rows[0].get_attribute("data-ack") if rows else None


def _follow_the_acknowledgement(facade: WebFacade, radiologist: Any, alert: dict[str, Any]) -> None:
    """Awaiting acknowledgement; escalated once the timeout passed with none; acknowledged late by
    the ordering practitioner (their own token, as their app would)."""
    wait_for(radiologist, lambda d: _acknowledgement(d, alert["id"]) == "waiting", message="no critical row")
    row_text = _by_css(radiologist, f'tr[data-communication-id="{alert["id"]}"]')[0].text
    assert "Awaiting acknowledgement" in row_text and "Dr Clinician" in row_text, row_text
    assert "Colin Demo" in row_text and CONCLUSION in row_text, row_text
    radiologist.execute_script("document.getElementById('wl-report').scrollIntoView()")
    screenshot(radiologist, "worklist-signed")
    assert_accessible(radiologist)

    with facade.system_api() as api:
        deadline = time.monotonic() + ACK_TIMEOUT + 30
        while not _found(api, "Task", code=FOLLOW_UP, focus=f"Communication/{alert['id']}"):
            assert time.monotonic() < deadline, "not escalated"
            time.sleep(0.5)
    _by_css(radiologist, "#wl-refresh")[0].click()
    wait_for(radiologist, lambda d: _acknowledgement(d, alert["id"]) == "escalated", message="no escalation")
    assert "escalated" in _by_css(radiologist, f'tr[data-communication-id="{alert["id"]}"]')[0].text

    with facade.profile_api(CLINICIAN, "reader") as ordering:
        current = ordering.get(f"Communication/{alert['id']}").json()
        done = {**current, "status": "completed", "received": current["sent"]}
        response = ordering.put(f"Communication/{alert['id']}", json=done)
        assert response.status_code == 200, response.text
    _by_css(radiologist, "#wl-refresh")[0].click()
    wait_for(radiologist, lambda d: _acknowledgement(d, alert["id"]) == "acknowledged", message="no ack")
    acknowledged = _by_css(radiologist, f'tr[data-communication-id="{alert["id"]}"]')[0].text
    assert "Acknowledged" in acknowledged and "after escalation" in acknowledged, acknowledged
    radiologist.execute_script("document.getElementById('wl-critical').scrollIntoView()")
    screenshot(radiologist, "worklist-acknowledged")


def test_claim_write_sign_and_follow_the_critical_result(
    web_facade: WebFacade, reading_task: dict[str, Any], driver: Any, second_driver: Any
) -> None:
    task_id = reading_task["task"]["id"]
    radiologist, colleague = driver, second_driver

    # Both practitioners open the worklist; the study waits, triaged, with the AI's finding.
    _open_worklist(radiologist, web_facade, RADIOLOGIST)
    _open_worklist(colleague, web_facade, ADMIN)
    for browser in (radiologist, colleague):
        _see_the_triaged_tasks(browser, task_id, reading_task["asap"]["id"])
    screenshot(radiologist, "worklist-waiting")
    assert_accessible(radiologist)

    _claim_and_lose_the_race(web_facade, radiologist, colleague, task_id)
    _release_and_claim_again(web_facade, radiologist, task_id)
    draft = _write_a_draft(web_facade, radiologist, task_id)

    _sign_in_expires_while_writing(web_facade, radiologist, task_id)

    # Sign: the page shows the Task completed by the server.
    _by_css(radiologist, "#wl-sign")[0].click()
    wait_for(radiologist, lambda d: _by_css(d, "#wl-signed-task"), message="the report was not signed")
    assert "completed" in _by_css(radiologist, "#wl-signed-task")[0].text
    wait_for(radiologist, lambda d: _row(d, "wl-mine-rows", task_id) is None, message="still in my reads")
    with web_facade.system_api() as api:
        alert = _check_the_signed_report(api, draft["id"], reading_task["order"]["id"], task_id)

    _follow_the_acknowledgement(web_facade, radiologist, alert)

    # "Open study" hands the study to the viewer (the shell's ctx.openViewer).
    _click(colleague, "wl-waiting-rows", reading_task["asap"]["id"], "wl-open")
    wait_for(colleague, lambda d: "/viewer/" in d.current_url, message="the viewer was not opened")
    assert f"StudyInstanceUIDs={STUDY_B}" in colleague.current_url

    for browser in (radiologist, colleague):
        assert requested_hosts(browser) == {web_facade.host}
        assert [e for e in browser_errors(browser) if "Content Security Policy" in e] == []
