"""The reading loop end to end (ADR 0033): a real Orthanc and its change feed, the real `$analyze`
(the shipped ONNX model) on the demo brain, the SQL store, the REST API through the app.

Two facades share one SQLite store, one after the other, with different triage rules, so a newer
AI result of the same study re-triages the same reading Task: the first calls "no abnormality"
critical (stat), the second has the default rules (routine).
"""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pypdf
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from fhir_facade.reading.codes import AMENDMENT_REASON_EXTENSION, TASK_CODE_SYSTEM
from fhir_facade.reading.triage import NO_AI_NOTE
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.dicom_factory import demo_brain_study
from tests.facade_process import wait_for

STUDY_UID = "1.2.826.0.1.3680043.8.498.733.1"
PATIENT_ID = "READING-1"
ACCESSION = "READING-ACC-1"
READ = f"{TASK_CODE_SYSTEM}|read"
NO_ABNORMALITY = "http://snomed.info/sct|281900007"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-reading"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        http_auth=False,  # loopback only
    ) as instance:
        yield instance


@pytest.fixture(scope="module")
def database_url() -> str:
    return f"sqlite:///{tempfile.mkdtemp(prefix='facade-reading-')}/store.sqlite3"


def _server(orthanc: EmbeddedOrthanc, database_url: str, **overrides: Any) -> LiveServer:
    return serve(
        {
            "dicomweb_url": orthanc.dicomweb_url,
            "orthanc_url": orthanc.url,
            "database_url": database_url,
            "analyze_enabled": True,
            **overrides,
        }
    )


def _reading_task(client: httpx.Client) -> dict[str, Any] | None:
    bundle = ok_json(client.get("/Task", params={"code": READ, "focus": f"ImagingStudy/{STUDY_UID}"}))
    tasks = [e["resource"] for e in bundle.get("entry", [])]
    assert len(tasks) <= 1, "one reading Task per study"
    return tasks[0] if tasks else None


def _input_report(task: dict[str, Any]) -> str:
    (item,) = task["input"]
    return str(item["valueReference"]["reference"])


@pytest.fixture(scope="module")
def triaged(orthanc: EmbeddedOrthanc, database_url: str) -> dict[str, Any]:
    """Facade 1 (watching, "no abnormality" critical): the study arrives, gets a routine reading
    Task, `$analyze` raises it to stat. Returns what the later tests need."""
    with (
        _server(
            orthanc,
            database_url,
            watch_studies=True,
            watch_poll_interval=0.2,
            reading_critical_codes=[NO_ABNORMALITY],
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=120) as client,
    ):
        order = ok_json(
            client.post(
                "/ServiceRequest",
                json={
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "identifier": [{"system": "urn:oid:1.2.3.4.733", "value": ACCESSION}],
                    "code": {"text": "MR brain"},
                    "subject": {"reference": f"Patient/{PATIENT_ID}"},
                },
                headers=FHIR_JSON,
            ),
            201,
        )
        datasets = demo_brain_study(STUDY_UID, PATIENT_ID, 8)
        for ds in datasets:
            ds.AccessionNumber = ACCESSION
        with httpx.Client(timeout=60) as http:
            store_instances(http, orthanc.url, datasets)
        arrived = wait_for(lambda: _reading_task(client))
        report = ok_json(client.post(f"/ImagingStudy/{STUDY_UID}/$analyze"))
        after = _reading_task(client)
        assert after is not None
        return {"order": order, "arrived": arrived, "report": report, "after": after}


@pytest.fixture(scope="module")
def reading(orthanc: EmbeddedOrthanc, database_url: str, triaged: dict[str, Any]) -> Iterator[LiveServer]:
    """Facade 2 on the same store, default triage rules, no watching."""
    with _server(orthanc, database_url) as server:
        yield server


@pytest.fixture
def client(reading: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=reading.base_url, timeout=120) as http:
        yield http


class TestTriage:
    def test_an_arrived_study_gets_a_routine_reading_task(self, triaged: dict[str, Any]) -> None:
        task = triaged["arrived"]
        validate(task)
        assert task["status"] == "requested" and task["priority"] == "routine"
        assert task["for"] == {"reference": f"Patient/{PATIENT_ID}"}
        assert task["basedOn"] == [{"reference": f"ServiceRequest/{triaged['order']['id']}"}]
        assert task["note"] == [{"text": f"triage: {NO_AI_NOTE}"}]
        assert "input" not in task

    def test_the_ai_report_raises_it_to_stat(self, triaged: dict[str, Any]) -> None:
        task, report = triaged["after"], triaged["report"]
        assert task["id"] == triaged["arrived"]["id"], "the same Task, re-triaged"
        assert task["priority"] == "stat", "no abnormality is configured critical on this facade"
        assert _input_report(task) == f"DiagnosticReport/{report['id']}"
        assert "note" not in task
        assert report["conclusionCode"][0]["coding"][0]["code"] == "281900007"

    def test_a_newer_ai_result_lowers_it_again(self, client: httpx.Client, triaged: dict[str, Any]) -> None:
        newer = ok_json(client.post(f"/ImagingStudy/{STUDY_UID}/$analyze"))
        task = _reading_task(client)
        assert task is not None and task["id"] == triaged["arrived"]["id"]
        assert task["priority"] == "routine", "default rules: no abnormality is routine"
        assert _input_report(task) == f"DiagnosticReport/{newer['id']}"
        old = ok_json(client.get(f"/DiagnosticReport/{triaged['report']['id']}"))
        assert old["status"] == "cancelled", "superseded (ADR 0031)"

    def test_the_worklist_sorts_by_clinical_priority(self, client: httpx.Client) -> None:
        for priority in ("urgent", "stat", "routine", "asap"):
            ok_json(client.post("/Task", json=_task(priority), headers=FHIR_JSON), 201)
        bundle = ok_json(
            client.get(
                "/Task", params={"code": READ, "status": "requested", "_sort": "-priority,authored-on"}
            )
        )
        order = [e["resource"]["priority"] for e in bundle["entry"]]
        rank = {"stat": 3, "asap": 2, "urgent": 1, "routine": 0}
        assert [rank[p] for p in order] == sorted((rank[p] for p in order), reverse=True), order
        assert order[:3] == ["stat", "asap", "urgent"], "not alphabetical (urgent, stat, routine, asap)"


def _task(priority: str) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "priority": priority,
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "read"}]},
        "focus": {"reference": "ImagingStudy/1.2.826.0.1.3680043.8.498.733.99"},
    }


def _put(client: httpx.Client, task: dict[str, Any], etag: str) -> httpx.Response:
    return client.put(f"/Task/{task['id']}", json=task, headers={**FHIR_JSON, "If-Match": etag})


class TestClaim:
    def test_claim_stale_claim_conflict_release_reassign(self, client: httpx.Client) -> None:
        task = ok_json(client.post("/Task", json=_task("urgent"), headers=FHIR_JSON), 201)
        first_etag = f'W/"{task["meta"]["versionId"]}"'
        mine = {**task, "status": "in-progress", "owner": {"reference": "Practitioner/rad-a"}}
        response = _put(client, mine, first_etag)
        claimed = ok_json(response)
        assert claimed["owner"] == {"reference": "Practitioner/rad-a"}
        theirs = {**claimed, "owner": {"reference": "Practitioner/rad-b"}}
        outcome(_put(client, theirs, first_etag), 412, "conflict")  # lost the race
        body = outcome(_put(client, theirs, response.headers["ETag"]), 409, "conflict")
        assert body["issue"][0]["details"]["coding"][0]["code"] == "reading_task_claimed"
        released = {k: v for k, v in claimed.items() if k != "owner"} | {"status": "requested"}
        response = _put(client, released, response.headers["ETag"])
        assert "owner" not in ok_json(response)
        retaken = ok_json(
            _put(client, {**released, "status": "accepted", **_owner("rad-b")}, response.headers["ETag"])
        )
        assert retaken["owner"] == {"reference": "Practitioner/rad-b"} and retaken["status"] == "accepted"

    def test_a_claim_without_owner_or_fhir_user_is_422(self, client: httpx.Client) -> None:
        task = ok_json(client.post("/Task", json=_task("routine"), headers=FHIR_JSON), 201)
        body = outcome(
            _put(client, {**task, "status": "accepted"}, f'W/"{task["meta"]["versionId"]}"'), 422, "required"
        )
        assert body["issue"][0]["details"]["coding"][0]["code"] == "reading_task_owner_missing"


def _owner(name: str) -> dict[str, Any]:
    return {"owner": {"reference": f"Practitioner/{name}"}}


def _section(code: str, title: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": title.lower(),
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}], "text": title},
        "valueString": text,
    }


CONCLUSION = "No intracranial mass. Normal MR brain for age."


def _report(order_id: str) -> dict[str, Any]:
    sections = [
        _section("55111-9", "Technique", "Axial T1-weighted MR of the brain."),
        _section("18834-2", "Comparison", "None."),
        _section("59776-5", "Findings", "Normal ventricles. No mass, no oedema."),
        _section("19005-8", "Impression", "Normal study."),
    ]
    return {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": "18748-4"}], "text": "MR brain report"},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
        "imagingStudy": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
        "contained": sections,
        "result": [{"reference": f"#{s['id']}"} for s in sections],
        "conclusion": CONCLUSION,
        "conclusionCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "281900007"}]}],
    }


def _pdf_text(report: dict[str, Any]) -> str:
    (form,) = [f for f in report["presentedForm"] if f["contentType"] == "application/pdf"]
    assert form["contentType"] == "application/pdf"
    reader = pypdf.PdfReader(io.BytesIO(base64.b64decode(form["data"])))
    return "\n".join(page.extract_text() for page in reader.pages)


def _pdf_instances(orthanc: EmbeddedOrthanc) -> list[pydicom.Dataset]:
    with httpx.Client(timeout=30) as http:
        found = http.get(
            f"{orthanc.dicomweb_url}/studies/{STUDY_UID}/instances",
            params={"SOPClassUID": ENCAPSULATED_PDF},
        )
        if found.status_code == 204 or not found.content:
            return []
        datasets = []
        for item in found.json():
            series, sop = item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
            ids = http.post(f"{orthanc.url}/tools/lookup", content=sop).json()
            data = http.get(f"{orthanc.url}/instances/{ids[0]['ID']}/file").content
            datasets.append(pydicom.dcmread(io.BytesIO(data)))
            assert datasets[-1].SeriesInstanceUID == series
        return datasets


class TestRadiologistReport:
    def test_draft_sign_amend(
        self, client: httpx.Client, triaged: dict[str, Any], orthanc: EmbeddedOrthanc
    ) -> None:
        draft = ok_json(
            client.post("/DiagnosticReport", json=_report(triaged["order"]["id"]), headers=FHIR_JSON), 201
        )
        assert "Findings" in _pdf_text(draft) and CONCLUSION in _pdf_text(draft), "rendered while drafting"
        task = _reading_task(client)
        assert task is not None and task["status"] == "requested", "a draft completes nothing"

        unsigned = {**draft, "status": "final"}
        body = outcome(
            client.put(f"/DiagnosticReport/{draft['id']}", json=unsigned, headers=FHIR_JSON), 422, "required"
        )
        assert body["issue"][0]["details"]["coding"][0]["code"] == "report_interpreter_missing"

        signed = {
            **unsigned,
            "resultsInterpreter": [{"reference": "Practitioner/rad-b", "display": "Dr Berta Bild"}],
        }
        final = ok_json(client.put(f"/DiagnosticReport/{draft['id']}", json=signed, headers=FHIR_JSON))
        text = _pdf_text(final)
        assert CONCLUSION in text and "Dr Berta Bild" in text and "final" in text

        task = _reading_task(client)
        assert task is not None and task["status"] == "completed"
        assert task["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{draft['id']}"}
        validate(task)

        (instance,) = wait_for(lambda: _pdf_instances(orthanc), timeout=20)
        assert instance.SOPClassUID == ENCAPSULATED_PDF
        assert instance.StudyInstanceUID == STUDY_UID and instance.PatientID == PATIENT_ID
        assert str(instance.PatientName) == "Demo^Colin" and instance.AccessionNumber == ACCESSION
        assert instance.Modality == "DOC" and instance.SeriesNumber == 9801
        assert instance.MIMETypeOfEncapsulatedDocument == "application/pdf"
        assert instance.EncapsulatedDocument.startswith(b"%PDF")

        back = {**final, "status": "preliminary"}
        outcome(
            client.put(f"/DiagnosticReport/{draft['id']}", json=back, headers=FHIR_JSON), 422, "business-rule"
        )
        amended = {**final, "status": "amended", "conclusion": CONCLUSION + " Addendum: small old lacune."}
        body = outcome(
            client.put(f"/DiagnosticReport/{draft['id']}", json=amended, headers=FHIR_JSON), 422, "required"
        )
        assert body["issue"][0]["details"]["coding"][0]["code"] == "report_amendment_reason_missing"
        reason = {
            "url": AMENDMENT_REASON_EXTENSION,
            "valueAnnotation": {"text": "Lacune overlooked in the left thalamus."},
        }
        done = ok_json(
            client.put(
                f"/DiagnosticReport/{draft['id']}", json={**amended, "extension": [reason]}, headers=FHIR_JSON
            )
        )
        assert done["status"] == "amended" and "Addendum" in _pdf_text(done)

        history = ok_json(client.get(f"/DiagnosticReport/{draft['id']}/_history"))
        statuses = [e["resource"]["status"] for e in history["entry"]]
        assert statuses == ["amended", "final", "preliminary"], statuses
        numbers = wait_for(
            lambda: sorted(i.SeriesNumber for i in _pdf_instances(orthanc)) == [9801, 9802] or None, 20
        )
        assert numbers

    def test_signing_the_ai_report_itself_keeps_its_sr_link_and_adds_a_pdf(
        self, client: httpx.Client
    ) -> None:
        bundle = ok_json(
            client.get(
                "/DiagnosticReport",
                params={"patient": PATIENT_ID, "status": "preliminary"},
            )
        )
        (ai,) = [e["resource"] for e in bundle["entry"] if not e["resource"].get("resultsInterpreter")]
        signed = {**ai, "status": "final", "resultsInterpreter": [{"reference": "Practitioner/rad-a"}]}
        final = ok_json(client.put(f"/DiagnosticReport/{ai['id']}", json=signed, headers=FHIR_JSON))
        types = sorted(f["contentType"] for f in final["presentedForm"])
        assert types == ["application/dicom", "application/pdf"]
        assert ai["conclusion"][:40] in " ".join(_pdf_text(final).split())
