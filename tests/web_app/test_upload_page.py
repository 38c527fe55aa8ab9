"""The app's Upload page (issue 18) in a real browser against a real facade and Orthanc: an
administrator drops a zip (a valid CT study, a non-DICOM file, a broken DICOM) and a single file,
sees their tags read in the browser, picks the EHR's Patient and order, sees what will be coerced,
imports (`ImagingStudy/$import`, ADR 0038: the zip as a job with X-Progress, the file directly) and
gets the per-instance result; the PACS then holds the coerced identity with the previous values in
the Original Attributes Sequence (PS3.3 C.12.1.1.9, ADR 0039). A patient-confined user gets
neither the page nor the operation."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests import dicom_factory
from tests.conftest import ok_json, outcome
from tests.intake.conftest import valid_ct_study, zip_of
from tests.web_app.conftest import (
    ADMIN,
    CLINICIAN,
    PATIENT_A,
    WebFacade,
    assert_accessible,
    browser_errors,
    launch_standalone,
    requested_hosts,
    requested_urls,
    screenshot,
    wait_for,
)

MRN = "MRN-UPLOAD-1"
ACCESSION = "ACC-UP-1"
MODALITY_PATIENT = "MODALITY-UP"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


@pytest.fixture(scope="module")
def web_settings() -> dict[str, Any]:
    """No arrival watcher: the imported studies need no analysis here."""
    return {"watch_studies": False}


@pytest.fixture(scope="module")
def ehr(web_facade: WebFacade) -> dict[str, dict[str, Any]]:
    """The EHR's Patient (with an MRN in the site's system) and an order for it with an accession,
    written by the tests' backend client."""
    system = web_facade.server.app.state.settings.patient_identifier_system
    with web_facade.system_api() as api:
        patient = ok_json(
            api.post(
                "Patient",
                json={
                    "resourceType": "Patient",
                    "identifier": [{"system": system, "value": MRN}],
                    "name": [{"family": "Uploadova", "given": ["Ida"]}],
                    "birthDate": "1975-06-07",
                    "gender": "female",
                },
            ),
            201,
        )
        order = ok_json(
            api.post(
                "ServiceRequest",
                json={
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "subject": {"reference": f"Patient/{patient['id']}"},
                    "code": {"text": "CT chest"},
                    "identifier": [
                        {
                            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                            "system": "urn:oid:1.2.3.99",
                            "value": ACCESSION,
                        }
                    ],
                },
            ),
            201,
        )
    return {"patient": patient, "order": order}


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A zip (two CT instances under the modality's PatientID, a README, a broken DICOM) and a
    single file of another study, written to disk for the browser's file input."""
    folder = tmp_path_factory.mktemp("uploads")
    study = valid_ct_study(MODALITY_PATIENT, "Wrong^Name", n_instances=2)
    single = valid_ct_study(MODALITY_PATIENT, "Wrong^Name", n_instances=1)[0]
    broken = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7fnot a header at all" * 8
    archive = zip_of(
        {
            "CD/STUDY/IM1": dicom_factory.to_bytes(study[0]),
            "CD/STUDY/IM2": dicom_factory.to_bytes(study[1]),
            "CD/README.txt": b"burnt by the modality",
            "CD/broken.dcm": broken,
        }
    )
    (folder / "cd.zip").write_bytes(archive)
    (folder / "single.dcm").write_bytes(dicom_factory.to_bytes(single))
    return {"folder": folder, "study": study, "single": single}


@pytest.fixture
def orthanc(web_orthanc: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web_orthanc.url, timeout=30) as client:
        yield client


def _stored(orthanc: httpx.Client, sop_uid: str) -> pydicom.Dataset:
    found = [
        r["ID"] for r in orthanc.post("/tools/lookup", content=sop_uid).json() if r["Type"] == "Instance"
    ]
    assert len(found) == 1, (sop_uid, found)
    return pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{found[0]}/file").content))


def _text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))


def _scroll_to(driver: Any, element_id: str) -> None:
    script = "document.getElementById(arguments[0]).scrollIntoView({block: 'center'})"
    driver.execute_script(script, element_id)


def _open_upload(driver: Any) -> None:
    driver.execute_script("window.location.hash = '#/upload'")


def test_the_admin_uploads_matches_and_imports(
    driver: Any,
    web_facade: WebFacade,
    ehr: dict[str, dict[str, Any]],
    uploads: dict[str, Any],
    orthanc: httpx.Client,
) -> None:
    from selenium.webdriver.common.by import By

    patient, order = ehr["patient"], ehr["order"]
    launch_standalone(driver, web_facade, "admin", ADMIN)
    _open_upload(driver)
    file_input = wait_for(driver, lambda d: d.find_elements(By.ID, "upload-files"), message="no upload page")[
        0
    ]
    assert driver.find_elements(By.ID, "upload-dropzone"), "the drop zone is part of the page"

    # Drop the zip and the single file (Selenium types the paths into the file input).
    folder: Path = uploads["folder"]
    file_input.send_keys(f"{folder / 'cd.zip'}\n{folder / 'single.dcm'}")
    wait_for(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "table.upload-tags")) == 2,
        message="the tags of both files were not shown",
    )
    tags = _text(driver, "#upload-preview")
    assert MODALITY_PATIENT in tags and "Wrong^Name" in tags and "19700101" in tags
    rows = {
        row.find_element(By.TAG_NAME, "th").text: row.text
        for row in driver.find_elements(By.CSS_SELECTOR, "table.upload-tags tbody tr")
    }
    assert set(rows) == {"CD/STUDY/IM1", "CD/STUDY/IM2", "CD/README.txt", "CD/broken.dcm", "single.dcm"}
    assert "not a DICOM Part 10 file" in rows["CD/README.txt"]
    assert "cannot be read" in rows["CD/broken.dcm"]
    assert rows["CD/STUDY/IM1"].split()[1] == MODALITY_PATIENT
    assert " CT " in f" {rows['single.dcm']} "
    assert "nothing coerced" in _text(driver, "#upload-coercion")
    screenshot(driver, "upload-tags")

    # Match the patient by MRN and take its order.
    driver.find_element(By.ID, "upload-patient-query").send_keys(MRN)
    driver.find_element(By.ID, "upload-patient-search").click()
    radio = wait_for(
        driver,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, f'input[name="upload-patient"][value="Patient/{patient["id"]}"]'
        ),
        message="the patient was not found",
    )[0]
    driver.find_element(By.CSS_SELECTOR, f'label[for="{radio.get_attribute("id")}"]').click()
    assert MRN in driver.find_element(By.ID, "upload-patient-chosen").text
    driver.find_element(By.ID, "upload-order-for-patient").click()
    order_radio = wait_for(
        driver,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, f'input[name="upload-order"][value="ServiceRequest/{order["id"]}"]'
        ),
        message="the patient's order was not listed",
    )[0]
    order_radio.click()
    assert ACCESSION in driver.find_element(By.ID, "upload-order-chosen").text

    # What will be coerced, old -> new.
    coercion = {
        row.find_element(By.TAG_NAME, "th").text: [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        for row in driver.find_elements(By.CSS_SELECTOR, "#upload-coercion-table tbody tr")
    }
    assert coercion["PatientID"][:2] == [MODALITY_PATIENT, MRN]
    assert coercion["PatientName"][:2] == ["Wrong^Name", "Uploadova^Ida"]
    assert coercion["PatientBirthDate"][:2] == ["19700101", "19750607"]
    assert coercion["AccessionNumber"][:2] == ["(empty)", ACCESSION]
    assert "PatientSex" not in coercion  # F in the files and in the EHR
    assert coercion["IssuerOfPatientID"][0] == "(empty)"
    assert web_facade.server.app.state.settings.patient_identifier_system in coercion["IssuerOfPatientID"][1]
    assert coercion["PatientID"][2] == "3"  # three readable instances carry it
    _scroll_to(driver, "upload-match-heading")
    screenshot(driver, "upload-matching")
    _scroll_to(driver, "upload-coercion")
    screenshot(driver, "upload-coercion")
    assert_accessible(driver)

    # Import: the zip runs as a job (X-Progress), the single file directly.
    driver.find_element(By.ID, "upload-import").click()
    wait_for(
        driver,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "table.upload-instances")) == 2
            or d.find_elements(By.CSS_SELECTOR, ".upload-result .error")
        ),
        timeout=180,
        message="no result table",
    )
    assert not driver.find_elements(By.CSS_SELECTOR, ".upload-result .error"), _text(
        driver, "#upload-results"
    )
    results = {
        row.find_element(By.TAG_NAME, "th").text: (
            row.get_attribute("data-status"),
            row.find_elements(By.TAG_NAME, "td")[-1].text,
        )
        for row in driver.find_elements(By.CSS_SELECTOR, "table.upload-instances tbody tr")
    }
    assert results["CD/STUDY/IM1"][0] == results["CD/STUDY/IM2"][0] == "stored-with-warnings", results
    assert "coerced PatientID" in results["CD/STUDY/IM1"][1]
    assert results["CD/README.txt"][0] == "skipped" and "not a DICOM" in results["CD/README.txt"][1]
    assert results["CD/broken.dcm"][0] == "refused" and results["CD/broken.dcm"][1] not in ("", "—")
    assert results["single.dcm"][0] == "stored-with-warnings", results
    summary = _text(driver, ".upload-summary")
    assert "2 stored with warnings, 1 refused, 1 skipped" in summary and "1 stored with warnings" in summary
    _scroll_to(driver, "upload-import-heading")
    screenshot(driver, "upload-result")
    assert_accessible(driver)

    # The PACS holds the EHR's identity, the modality's in the Original Attributes Sequence.
    for ds in [*uploads["study"], uploads["single"]]:
        stored = _stored(orthanc, ds.SOPInstanceUID)
        assert stored.PatientID == MRN
        assert str(stored.PatientName) == "Uploadova^Ida"
        assert stored.AccessionNumber == ACCESSION
        assert stored.get("IssuerOfPatientID", "") == ""  # the site's own MRN system: no issuer
        [item] = stored.OriginalAttributesSequence
        assert item.ReasonForTheAttributeModification == "COERCE"
        assert item.ModifyingSystem == "fhir-facade $import"
        assert item.ModifiedAttributesSequence[0].PatientID == MODALITY_PATIENT
    # ... and the FHIR API files the study under the MRN and the order.
    with web_facade.system_api() as api:
        imaging_study = ok_json(api.get(f"ImagingStudy/{uploads['study'][0].StudyInstanceUID}"))
    assert imaging_study["subject"]["identifier"]["value"] == MRN
    assert f"ServiceRequest/{order['id']}" in [b.get("reference") for b in imaging_study.get("basedOn", [])]

    # The zip went as a job (202, then polls of its status with X-Progress), the file directly.
    urls = requested_urls(driver)
    imports = [u for u in urls if "/ImagingStudy/$import" in u]
    assert len(imports) == 2 and all(f"patient=Patient%2F{patient['id']}" in u for u in imports), imports
    assert any("/$import-jobs/" in u for u in urls)
    assert requested_hosts(driver) == {web_facade.host}
    assert browser_errors(driver) == []


def test_a_patient_confined_user_gets_no_upload(driver: Any, web_facade: WebFacade) -> None:
    from selenium.webdriver.common.by import By

    ctx = launch_standalone(driver, web_facade, "patient", CLINICIAN, patient=PATIENT_A)
    _open_upload(driver)
    wait_for(
        driver,
        lambda d: "does not allow this page" in d.find_element(By.TAG_NAME, "main").text,
        message="the upload route did not say it is not for this sign-in",
    )
    assert "Upload" not in [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#nav a")]
    assert not driver.find_elements(By.ID, "upload-files")
    screenshot(driver, "upload-refused-for-patient")
    # The server refuses the operation with the token the app holds, also for the user's own patient.
    body = dicom_factory.to_bytes(valid_ct_study("CONFINED-1", n_instances=1)[0])
    answer = httpx.post(
        f"{web_facade.base_url}/ImagingStudy/$import",
        params={"patient": f"Patient/{PATIENT_A}"},
        content=body,
        headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {ctx['token']}"},
        timeout=60,
    )
    outcome(answer, 403, "forbidden")


def test_the_pages_libraries_are_served_from_the_vendor_folder(web_facade: WebFacade) -> None:
    """dicom-parser and JSZip come from .web-vendor (web/vendor.json) under the app's policy; no
    other name is served from there."""
    with httpx.Client(base_url=f"{web_facade.app_url}/vendor", timeout=30) as http:
        for name, marker in (("dicomParser.min.js", b"dicom-parser"), ("jszip.min.js", b"JSZip v3.10.1")):
            response = http.get(f"/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"].startswith("text/javascript")
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert marker in response.content[:400]
        outcome(http.get("/jszip.js"), 404, "not-found")


def test_files_dropped_on_the_drop_zone_are_read(
    driver: Any, web_facade: WebFacade, uploads: dict[str, Any]
) -> None:
    """The drop zone takes files as a drag and drop gives them (a DataTransfer on a drop event)."""
    from selenium.webdriver.common.by import By

    launch_standalone(driver, web_facade, "admin", ADMIN)
    _open_upload(driver)
    wait_for(driver, lambda d: d.find_elements(By.ID, "upload-dropzone"), message="no drop zone")
    # The file picker is the first stop of the keyboard on the page (the shell focuses <main>).
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("document.getElementById('main').focus()")
    ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.switch_to.active_element.get_attribute("id") == "upload-files"
    content = base64.b64encode((uploads["folder"] / "single.dcm").read_bytes()).decode()
    driver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.dcm', {type: 'application/dicom'}));
        const zone = document.getElementById('upload-dropzone');
        const init = {dataTransfer: transfer, bubbles: true, cancelable: true};
        zone.dispatchEvent(new DragEvent('dragover', init));
        zone.dispatchEvent(new DragEvent('drop', init));
        """,
        content,
    )
    row = wait_for(
        driver,
        lambda d: [
            r
            for r in d.find_elements(By.CSS_SELECTOR, "table.upload-tags tbody tr")
            if "dropped.dcm" in r.text
        ],
        message="the dropped file was not read",
    )[0]
    assert MODALITY_PATIENT in row.text and uploads["single"].Modality in row.text
    assert not driver.find_element(By.ID, "upload-import").get_attribute("disabled")
