"""Issue 15's whole reading loop, end to end, with real parts only (ADR 0033, 0034):

dcmtk `storescu` sends two MR studies to a real Orthanc -> the facade's change-feed watcher makes
their arrival Tasks and its analysis worker runs the shipped ONNX model -> each study has one
reading Task with the priority the configured triage rules give the AI result, the AI report as its
input -> a radiologist (SMART token from the built-in authorization server, fhirUser
Practitioner/rad-a) claims it with If-Match, and a second radiologist's claim is refused (412 stale,
409 owned) -> a preliminary draft -> the signed final report (interpreter from fhirUser, PDF
rendered by the facade and read back with pypdf) -> the Task completed -> the PDF in the study in
Orthanc (an Encapsulated PDF, found by QIDO-RS through the facade) -> the agreement with the AI
recorded -> `$ai-performance` counts it -> the report's critical finding sent as a Communication to
the order's requester, who acknowledges it (no escalation) -> the second study's critical result,
left unacknowledged, escalated after FACADE_READING_CRITICAL_ACK_TIMEOUT (a stat Task and an
AuditEvent).

One facade process (`python -m fhir_facade serve`, FACADE_AUTH=smart) for the module. Everything
the facade returns is validated against FHIR R4B (tests.conftest.ok_json / validate).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pydicom
import pypdf
import pytest

from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from fhir_facade.reading.agreement import AI_ASSESSMENT
from fhir_facade.reading.codes import TASK_CODE_SYSTEM
from fhir_facade.reading.critical import INTERPRETATION
from fhir_facade.reading.triage import TriageRules, ai_finding, triage
from tests.auth.fixtures.smart_app import LoginForm, pkce_pair
from tests.conftest import ok_json, outcome
from tests.dicom_factory import demo_brain_study
from tests.facade_process import FacadeProcess, wait_for

STORE_AET = "MR-SCANNER-1"
APP, CALLBACK = "reading-app", "http://127.0.0.1:9/callback"
PASSWORD = "reading loop password"
#: username -> fhirUser; all three may see every patient (a hospital's staff).
USERS = {"rad-a": "Practitioner/rad-a", "rad-b": "Practitioner/rad-b", "ward": "Practitioner/ward-doctor"}
SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
NO_ABNORMALITY, BRAIN_NEOPLASM = "281900007", "126952004"
#: This site's triage rules: an AI "no abnormality" is read first (stat), the rest as configured
#: by default. (The demo brain's AI class is "no abnormality"; a stat Task shows the rule applied.)
CRITICAL_CODES = [f"{SNOMED}|{NO_ABNORMALITY}"]
ACK_TIMEOUT = 5.0
READ = f"{TASK_CODE_SYSTEM}|read"
FOLLOW_UP = f"{TASK_CODE_SYSTEM}|critical-result-follow-up"
ALERT = "http://terminology.hl7.org/CodeSystem/communication-category|alert"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
IMPRESSION = "Large left frontal mass with midline shift; urgent neurosurgical review."


@dataclass(frozen=True)
class Study:
    uid: str
    patient: str
    accession: str


FIRST = Study("1.2.826.0.1.3680043.8.498.1515.1", "LOOP-1", "LOOP-ACC-1")
SECOND = Study("1.2.826.0.1.3680043.8.498.1515.2", "LOOP-2", "LOOP-ACC-2")


@dataclass
class Stack:
    orthanc: EmbeddedOrthanc
    facade: FacadeProcess
    folder: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.facade.port}"


def _registry(path: Path) -> None:
    digest = hash_secret(PASSWORD)  # scrypt is slow on purpose: once for the three users
    path.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": APP,
                        "name": "Reading workstation",
                        "kind": "public",
                        "redirect_uris": [CALLBACK],
                        "scope": "openid fhirUser user/*.cruds",
                    }
                ],
                "users": [
                    {"username": name, "password_hash": digest, "fhirUser": user, "all_patients": True}
                    for name, user in USERS.items()
                ],
            }
        )
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("whole-loop")
    _registry(folder / "clients.json")
    port = free_port()
    orthanc = EmbeddedOrthanc(
        folder / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        modalities=[DicomPeer(STORE_AET, "127.0.0.1")],
        http_auth=False,  # loopback only; the credentialed path: tests/embedded/test_pacs_access.py
    )
    env = {
        **os.environ,
        "FACADE_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        "FACADE_DATA_DIR": str(folder / "data"),
        "FACADE_DATABASE_URL": f"sqlite:///{folder / 'store.sqlite3'}",
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_ORTHANC_URL": orthanc.url,
        "FACADE_AUTH": "smart",
        "FACADE_AUTH_CLIENTS_FILE": str(folder / "clients.json"),
        "FACADE_WATCH_STUDIES": "true",
        "FACADE_WATCH_POLL_INTERVAL": "0.25",
        "FACADE_ANALYZE_ENABLED": "true",
        "FACADE_ANALYZE_POLL_INTERVAL": "0.25",
        "FACADE_READING_CRITICAL_CODES": json.dumps(CRITICAL_CODES),
        "FACADE_READING_CRITICAL_ACK_TIMEOUT": str(ACK_TIMEOUT),
        "FACADE_READING_CRITICAL_CHECK_INTERVAL": "0.25",
        "FACADE_AUDIT_ENABLED": "true",
        "FACADE_LOG_LEVEL": "WARNING",
    }
    facade = FacadeProcess(env, port)
    with orthanc:
        facade.start()
        try:
            yield Stack(orthanc, facade, folder)
        finally:
            facade.stop()


def user_token(stack: Stack, username: str) -> dict[str, str]:
    """SMART App Launch authorization code + PKCE at the built-in server: the Authorization header
    of `username`'s access token (its fhirUser claim is the user's Practitioner)."""
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": CALLBACK,
        "scope": "openid fhirUser user/*.cruds",
        "state": username,
        "aud": stack.facade.base_url,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    with httpx.Client(timeout=30) as browser:
        page = browser.get(f"{stack.root}/auth/authorize", params=params)
        assert page.status_code == 200, page.text
        redirect = LoginForm(page).submit(browser, username=username, password=PASSWORD, decision="allow")
        assert redirect.status_code == 302, redirect.text
        code = parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0]
        token = browser.post(
            f"{stack.root}/auth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": CALLBACK,
                "client_id": APP,
                "code_verifier": verifier,
            },
        )
    assert token.status_code == 200, token.text
    access = token.json()["access_token"]
    payload = access.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["fhirUser"] == USERS[username], claims
    return {"Authorization": f"Bearer {access}"}


def send_with_storescu(stack: Stack, studies: list[Study]) -> None:
    folder = stack.folder / "outgoing"
    folder.mkdir()
    files = []
    for study in studies:
        for n, ds in enumerate(demo_brain_study(study.uid, study.patient, 4)):
            ds.AccessionNumber = study.accession
            path = folder / f"{study.patient}-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(str(path))
    peer = [STORE_AET, "-aec", stack.orthanc.aet, "127.0.0.1", str(stack.orthanc.dicom_port)]
    done = subprocess.run(
        ["storescu", "-aet", *peer, *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def order(fhir: httpx.Client, study: Study) -> dict[str, Any]:
    return ok_json(
        fhir.post(
            "/ServiceRequest",
            json={
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "identifier": [{"system": "urn:oid:1.2.3.4.1515", "value": study.accession}],
                "code": {"text": "MR brain"},
                "subject": {"reference": f"Patient/{study.patient}"},
                "requester": {"reference": USERS["ward"], "display": "Dr Ward"},
            },
            headers=FHIR_JSON,
        ),
        201,
    )


def reading_task(fhir: httpx.Client, study: Study) -> dict[str, Any] | None:
    """The study's reading Task once its AI result has triaged it (it names the AI report)."""
    bundle = ok_json(fhir.get("/Task", params={"code": READ, "focus": f"ImagingStudy/{study.uid}"}))
    tasks = [e["resource"] for e in bundle.get("entry", [])]
    assert len(tasks) <= 1, "one reading Task per study"
    return tasks[0] if tasks and tasks[0].get("input") else None


def expected_triage(fhir: httpx.Client, ai_report: dict[str, Any]) -> str:
    """The priority the configured rules give this AI result (fhir_facade.reading.triage)."""
    finding = ok_json(fhir.get(f"/{ai_report['result'][0]['reference']}"))
    codes, score = ai_finding(ai_report, finding)
    rules = TriageRules(
        urgent_threshold=0.8,
        low_confidence=0.6,
        critical_codes=frozenset(CRITICAL_CODES),
        negative_codes=frozenset({f"{SNOMED}|281900007", f"{SNOMED}|373068000"}),
    )
    return triage(rules, codes, score).priority


def etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def section(code: str, title: str, text: str, *, critical: bool = False) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": title.lower(),
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}], "text": title},
        "valueString": text,
    }
    if critical:
        observation["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "AA"}]}]
    return observation


def draft(study: Study, order_id: str) -> dict[str, Any]:
    sections = [
        section("55111-9", "Technique", "Axial T1-weighted MR of the brain."),
        section("59776-5", "Findings", "5 cm left frontal mass, 9 mm midline shift to the right."),
        section("19005-8", "Impression", IMPRESSION, critical=True),
    ]
    return {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"coding": [{"system": LOINC, "code": "18748-4"}], "text": "MR brain report"},
        "subject": {"reference": f"Patient/{study.patient}"},
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
        "imagingStudy": [{"reference": f"ImagingStudy/{study.uid}"}],
        "contained": sections,
        "result": [{"reference": f"#{s['id']}"} for s in sections],
        "conclusion": IMPRESSION,
        "conclusionCode": [{"coding": [{"system": SNOMED, "code": BRAIN_NEOPLASM}]}],
    }


def pdf_text(report: dict[str, Any]) -> str:
    (form,) = [f for f in report["presentedForm"] if f["contentType"] == "application/pdf"]
    reader = pypdf.PdfReader(io.BytesIO(base64.b64decode(form["data"])))
    return " ".join(" ".join(page.extract_text() for page in reader.pages).split())


def pacs_pdfs(stack: Stack, fhir: httpx.Client, study: Study) -> list[pydicom.Dataset]:
    """The study's Encapsulated PDF instances: found by QIDO-RS through the facade (the reading
    app's token), read from Orthanc."""
    answer = fhir.get(
        f"{stack.root}/dicom-web/studies/{study.uid}/instances", params={"SOPClassUID": ENCAPSULATED_PDF}
    )
    assert answer.status_code in (200, 204), answer.text
    if answer.status_code == 204 or not answer.content:
        return []
    datasets: list[pydicom.Dataset] = []
    with httpx.Client(base_url=stack.orthanc.url, timeout=30) as pacs:
        for item in answer.json():
            (match,) = pacs.post("/tools/lookup", content=item["00080018"]["Value"][0]).json()
            datasets.append(pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{match['ID']}/file").content)))
    return datasets


def found(fhir: httpx.Client, resource_type: str, **params: str) -> list[dict[str, Any]]:
    bundle = ok_json(fhir.get(f"/{resource_type}", params=params))
    return [e["resource"] for e in bundle.get("entry", [])]


def claim_and_sign(
    fhir: httpx.Client, study: Study, order_id: str, task: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Claim (owner from fhirUser), draft, sign: (the claimed Task, the signed report)."""
    claimed = ok_json(
        fhir.put(
            f"/Task/{task['id']}",
            json={**task, "status": "in-progress"},
            headers={**FHIR_JSON, "If-Match": etag(task)},
        )
    )
    report = ok_json(fhir.post("/DiagnosticReport", json=draft(study, order_id), headers=FHIR_JSON), 201)
    signed = ok_json(
        fhir.put(
            f"/DiagnosticReport/{report['id']}",
            json={k: v for k, v in report.items() if k != "meta"} | {"status": "final"},
            headers={**FHIR_JSON, "If-Match": etag(report)},
        )
    )
    return claimed, signed


def test_the_whole_reading_loop(stack: Stack) -> None:
    started = time.monotonic()
    radiologist, colleague, ward = (user_token(stack, name) for name in ("rad-a", "rad-b", "ward"))
    with (
        httpx.Client(base_url=stack.facade.base_url, headers=radiologist, timeout=60) as fhir,
        httpx.Client(base_url=stack.facade.base_url, headers=colleague, timeout=60) as other,
        httpx.Client(base_url=stack.facade.base_url, headers=ward, timeout=60) as requester,
    ):
        # The ward doctor orders both studies; the scanner sends them (dcmtk storescu).
        orders = {s.uid: order(requester, s) for s in (FIRST, SECOND)}
        send_with_storescu(stack, [FIRST, SECOND])

        # The watcher's arrival Task, run by the analysis worker: the AI report re-triages the
        # study's reading Task to the configured rule's priority and is its input.
        task = wait_for(lambda: reading_task(fhir, FIRST), timeout=120)
        (arrival,) = found(fhir, "Task", code="analyze", focus=f"ImagingStudy/{FIRST.uid}")
        assert arrival["status"] == "completed"
        ai_report = ok_json(fhir.get(f"/{arrival['output'][0]['valueReference']['reference']}"))
        assert ai_report["status"] == "preliminary" and "resultsInterpreter" not in ai_report
        assert ai_report["conclusionCode"][0]["coding"][0]["code"] == NO_ABNORMALITY
        assert task["input"][0]["valueReference"] == {"reference": f"DiagnosticReport/{ai_report['id']}"}
        assert expected_triage(fhir, ai_report) == "stat"
        assert task["priority"] == "stat" and task["status"] == "requested"
        assert task["basedOn"] == [{"reference": f"ServiceRequest/{orders[FIRST.uid]['id']}"}]
        assert task["for"] == {"reference": f"Patient/{FIRST.patient}"}
        worklist = found(fhir, "Task", code=READ, status="requested", _sort="-priority,authored-on")
        assert task["id"] in [t["id"] for t in worklist]

        # Claim with If-Match; the owner is the token's fhirUser. A colleague's claim on the version
        # seen before is 412, on the current one 409 (claimed by rad-a).
        claimed = ok_json(
            fhir.put(
                f"/Task/{task['id']}",
                json={**task, "status": "in-progress"},
                headers={**FHIR_JSON, "If-Match": etag(task)},
            )
        )
        assert claimed["owner"] == {"reference": USERS["rad-a"]} and claimed["status"] == "in-progress"
        theirs = {**task, "status": "in-progress", "owner": {"reference": USERS["rad-b"]}}
        outcome(
            other.put(f"/Task/{task['id']}", json=theirs, headers={**FHIR_JSON, "If-Match": etag(task)}),
            412,
            "conflict",
        )
        body = outcome(
            other.put(f"/Task/{task['id']}", json=theirs, headers={**FHIR_JSON, "If-Match": etag(claimed)}),
            409,
            "conflict",
        )
        assert body["issue"][0]["details"]["coding"][0]["code"] == "reading_task_claimed"

        # Draft (preliminary): rendered, nothing completed yet.
        report = ok_json(
            fhir.post("/DiagnosticReport", json=draft(FIRST, orders[FIRST.uid]["id"]), headers=FHIR_JSON), 201
        )
        assert report["status"] == "preliminary" and IMPRESSION in pdf_text(report)
        assert ok_json(fhir.get(f"/Task/{task['id']}"))["status"] == "in-progress"

        # Sign: final; the interpreter is the token's fhirUser; the PDF says who signed and what.
        signed = ok_json(
            fhir.put(
                f"/DiagnosticReport/{report['id']}",
                json={k: v for k, v in report.items() if k != "meta"} | {"status": "final"},
                headers={**FHIR_JSON, "If-Match": etag(report)},
            )
        )
        assert signed["status"] == "final"
        assert signed["resultsInterpreter"] == [{"reference": USERS["rad-a"]}]
        text = pdf_text(signed)
        assert IMPRESSION in text and USERS["rad-a"] in text and "final" in text

        done = ok_json(fhir.get(f"/Task/{task['id']}"))
        assert done["status"] == "completed"
        assert done["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{report['id']}"}

        # The critical finding: a Communication to the order's requester, who acknowledges it at
        # once (well within FACADE_READING_CRITICAL_ACK_TIMEOUT, whatever the machine's load).
        (alert,) = found(
            requester, "Communication", category=ALERT, status="in-progress", patient=FIRST.patient
        )
        assert alert["priority"] == "stat" and alert["recipient"] == [orders[FIRST.uid]["requester"]]
        assert alert["about"] == [{"reference": f"DiagnosticReport/{report['id']}"}]
        assert alert["sender"] == {"reference": USERS["rad-a"]}
        acknowledged = ok_json(
            requester.put(
                f"/Communication/{alert['id']}",
                json={**alert, "status": "completed", "received": _now()},
                headers={**FHIR_JSON, "If-Match": etag(alert)},
            )
        )
        assert acknowledged["status"] == "completed"

        # The second study, read by rad-b and signed with a critical finding that nobody
        # acknowledges (its escalation is checked last, once its timeout has passed).
        second_task = wait_for(lambda: reading_task(other, SECOND), timeout=120)
        assert second_task["priority"] == "stat"
        second_claim, second = claim_and_sign(other, SECOND, orders[SECOND.uid]["id"], second_task)
        assert second_claim["owner"] == {"reference": USERS["rad-b"]}
        assert second["resultsInterpreter"] == [{"reference": USERS["rad-b"]}]
        (unanswered,) = found(requester, "Communication", category=ALERT, patient=SECOND.patient)
        assert unanswered["status"] == "in-progress"

        # The first report in the PACS: an Encapsulated PDF in a new series of the study.
        (instance,) = wait_for(lambda: pacs_pdfs(stack, fhir, FIRST), timeout=30)
        assert instance.SOPClassUID == ENCAPSULATED_PDF and instance.Modality == "DOC"
        assert instance.StudyInstanceUID == FIRST.uid and instance.PatientID == FIRST.patient
        assert instance.SeriesNumber == 9801 and instance.AccessionNumber == FIRST.accession
        stored = pypdf.PdfReader(io.BytesIO(instance.EncapsulatedDocument))
        assert IMPRESSION in " ".join(" ".join(p.extract_text() for p in stored.pages).split())

        # The agreement with the AI: rad-a called a neoplasm, the AI "no abnormality": disagree.
        (assessment,) = found(
            fhir,
            "Observation",
            code=f"{AI_ASSESSMENT}|ai-agreement",
            focus=f"DiagnosticReport/{report['id']}",
        )
        assert assessment["valueCodeableConcept"]["coding"][0]["code"] == "disagree"
        assert {"reference": f"DiagnosticReport/{ai_report['id']}"} in assessment["focus"]
        assert assessment["performer"] == [{"reference": USERS["rad-a"]}]
        (provenance,) = found(fhir, "Provenance", target=f"Observation/{assessment['id']}")
        assert provenance["entity"] == [
            {"role": "source", "what": {"reference": f"DiagnosticReport/{ai_report['id']}"}}
        ]

        # $ai-performance counts both reads (rad-b disagreed with the AI too).
        performance = ok_json(fhir.get("/DiagnosticReport/$ai-performance"))
        (model,) = performance["parameter"]
        assert {"name": "model", "valueString": "brain-tumor-vgg16"} in model["part"]
        (ai_class,) = [p for p in model["part"] if p["name"] == "class"]
        counts = {p["name"]: p.get("valueInteger") for p in ai_class["part"] if p["name"] != "code"}
        assert counts == {"agree": 0, "disagree": 2, "partial": 0, "total": 2}, counts

        # Escalated after the acknowledgement timeout: a stat follow-up Task and an AuditEvent.
        (follow_up,) = wait_for(
            lambda: found(
                fhir, "Task", code=FOLLOW_UP, status="requested", focus=f"Communication/{unanswered['id']}"
            ),
            timeout=ACK_TIMEOUT + 10,
        )
        assert follow_up["priority"] == "stat" and follow_up["status"] == "requested"
        assert follow_up["for"] == {"reference": f"Patient/{SECOND.patient}"}
        assert follow_up["input"][0]["valueReference"] == {"reference": f"DiagnosticReport/{second['id']}"}
        (event,) = wait_for(lambda: escalation_events(fhir, follow_up["id"]), timeout=10)
        whats = [e["what"]["reference"] for e in event["entity"]]
        assert f"Communication/{unanswered['id']}" in whats and f"DiagnosticReport/{second['id']}" in whats

        # The acknowledged one is not escalated, past its timeout and a few checks.
        time.sleep(max(0.0, _epoch(alert["sent"]) + ACK_TIMEOUT + 1.0 - time.time()))
        assert found(fhir, "Task", code=FOLLOW_UP, focus=f"Communication/{alert['id']}") == []
        assert ok_json(fhir.get(f"/Communication/{unanswered['id']}"))["status"] == "in-progress"
    print(f"whole loop: {time.monotonic() - started:.1f} s")


def escalation_events(fhir: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    events = found(fhir, "AuditEvent", entity=f"Task/{task_id}")
    return [e for e in events if e.get("subtype", [{}])[0].get("code") == "critical-result-follow-up"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(instant: str) -> float:
    return datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp()
