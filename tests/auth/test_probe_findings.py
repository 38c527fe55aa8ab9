"""What the attacker's probe found (issue 11), each proven over real HTTP against a FACADE_AUTH=smart
facade whose tokens come from its own built-in authorization server: a user signs in with a password
and PKCE for a patient/ token, a backend service signs a client assertion for a system/ token.

Patients PROBE-A (the attacker's own) and PROBE-B (the victim) each have a real brain MRI study in a
real Orthanc; the analysis worklist runs the real model. A token confined to PROBE-A must neither see
nor act on anything of PROBE-B's, and its errors must not tell "not there" from "not yours"."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc.jwk import RSAKey
from pydicom.uid import generate_uid

from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.auth.server.registry import DEMO_PATIENTS, DEMO_USERNAME, create_demo_registry
from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances
from fhir_facade.watcher.arrival_tasks import ANALYZE_CODE
from tests.auth.fixtures.smart_app import ASSERTION_TYPE, client_assertion, pkce_pair, sign_in
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import CORPUS_ROOT, demo_brain_study, to_bytes
from tests.dicomweb_proxy.conftest import new_study

PATIENT_A, PATIENT_B = "PROBE-A", "PROBE-B"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.727.9301", "1.2.826.0.1.3680043.8.498.727.9302"
APP, ADMIN = "probe-app", "probe-admin"
CALLBACK = "http://127.0.0.1:9000/callback"
PASSWORD = "correct horse battery staple"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
APP_SCOPE = "launch/patient openid fhirUser patient/*.cruds user/*.cruds"


class Probe:
    """The facade under attack and the way to its tokens."""

    def __init__(self, server: LiveServer, admin_key: RSAKey) -> None:
        self.server = server
        self.root = server.base_url.removesuffix("/fhir")
        self._admin_key = admin_key

    def user_token(self, username: str, scope: str, patient: str | None = None) -> dict[str, str]:
        """Sign `username` in at the built-in server (authorization code + PKCE) and exchange the code."""
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": APP,
            "redirect_uri": CALLBACK,
            "scope": scope,
            "state": uuid.uuid4().hex,
            "aud": self.server.base_url,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        with httpx.Client(timeout=30, follow_redirects=False) as browser:
            answer = sign_in(
                browser,
                f"{self.root}/auth/authorize",
                username=username,
                password=PASSWORD,
                patient=patient,
                params=params,
            )
            assert answer.status_code == 302, answer.text
            code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
            token = browser.post(
                f"{self.root}/auth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": CALLBACK,
                    "client_id": APP,
                    "code_verifier": verifier,
                },
            )
        body = _token_json(token)
        if patient is not None:
            assert body["patient"] == patient
        return {**FHIR_JSON, "Authorization": f"Bearer {body['access_token']}"}

    def patient_token(self, patient: str, scope: str = "launch/patient patient/*.cruds") -> dict[str, str]:
        username = {PATIENT_A: "alice", PATIENT_B: "bob"}[patient]
        return self.user_token(username, scope, patient)

    def admin_token(self, scope: str = "system/*.cruds") -> dict[str, str]:
        """A SMART Backend Services token (client_credentials + private_key_jwt)."""
        token_url = f"{self.root}/auth/token"
        with httpx.Client(timeout=30) as http:
            response = http.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": scope,
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": client_assertion(self._admin_key, ADMIN, token_url),
                },
            )
        return {**FHIR_JSON, "Authorization": f"Bearer {_token_json(response)['access_token']}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, timeout=120)


@pytest.fixture(scope="module")
def probe(loaded_orthanc: EmbeddedOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probe]:
    with httpx.Client(timeout=60) as http:
        store_instances(http, loaded_orthanc.url, demo_brain_study(STUDY_A, PATIENT_A, 2))
        store_instances(http, loaded_orthanc.url, demo_brain_study(STUDY_B, PATIENT_B, 2))
    admin_key = RSAKey.generate_key(2048, parameters={"kid": "probe-admin-1"}, private=True)
    password = hash_secret(PASSWORD)
    registry = {
        "clients": [
            {
                "client_id": APP,
                "kind": "public",
                "redirect_uris": [CALLBACK],
                "scope": APP_SCOPE,
            },
            {
                "client_id": ADMIN,
                "kind": "backend-service",
                "scope": "system/*.cruds",
                "jwks": {"keys": [admin_key.as_dict(private=False)]},
            },
        ],
        "users": [
            {"username": "alice", "password_hash": password, "patients": [PATIENT_A]},
            {"username": "bob", "password_hash": password, "patients": [PATIENT_B]},
            {"username": "reader", "password_hash": password, "all_patients": True},
            {"username": "nobody", "password_hash": password},
        ],
    }
    folder = tmp_path_factory.mktemp("probe")
    registry_file = folder / "auth-clients.json"
    registry_file.write_text(json.dumps(registry))
    settings = {
        "auth": "smart",
        "auth_clients_file": registry_file,
        "data_dir": folder,
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "analyze_enabled": True,
        "analyze_worklist": True,
        "analyze_poll_interval": 0.3,
        "analyze_write_sr": False,
    }
    with serve(settings, port=free_port()) as server:
        yield Probe(server, admin_key)


def _analysis_task(patient: str, status: str, **fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "code": {"coding": [ANALYZE_CODE]},
        "for": {"reference": f"Patient/{patient}"},
    }
    task.update(fields)
    return task


def _completed_job_naming(report_id: str) -> dict[str, Any]:
    """A finished analysis job of PROBE-A's study whose output is `report_id`."""
    output = {"type": {"text": "report"}, "valueReference": {"reference": f"DiagnosticReport/{report_id}"}}
    return _analysis_task(
        PATIENT_A, "completed", focus={"reference": f"ImagingStudy/{STUDY_A}"}, output=[output]
    )


def _token_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _report(patient: str, study: str | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "MR brain"},
        "subject": {"reference": f"Patient/{patient}"},
        "conclusion": f"confidential finding of {patient}",
    }
    if study:
        report["imagingStudy"] = [{"reference": f"ImagingStudy/{study}"}]
    return report


def _reports_about(http: httpx.Client, admin: dict[str, str], study: str) -> list[dict[str, Any]]:
    bundle = ok_json(http.get("DiagnosticReport", params={"_count": 200}, headers=admin))
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if any(r.get("reference") == f"ImagingStudy/{study}" for r in e["resource"].get("imagingStudy", []))
    ]


def _wait_for_status(
    http: httpx.Client, task_id: str, admin: dict[str, str], timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = ok_json(http.get(f"Task/{task_id}", headers=admin))
        if task["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return task
        time.sleep(0.3)


# -- 1. another patient's report through a forged job ---------------------------------------------


def test_forged_job_task_naming_another_patients_report_is_refused(probe: Probe) -> None:
    admin, own = probe.admin_token(), probe.patient_token(PATIENT_A)
    with probe.client() as http:
        secret = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)
        refused = http.post("Task", json=_completed_job_naming(secret["id"]), headers=own)
        outcome(refused, 422, "processing")
        assert secret["id"] in refused.text and PATIENT_B not in refused.text


def test_job_url_never_hands_out_another_patients_report(probe: Probe) -> None:
    """Even a job Task that names another patient's report (written by a system client, which may)
    serves nothing of it to a caller confined to the Task's patient: the report is read with the
    caller's rights."""
    admin, own = probe.admin_token(), probe.patient_token(PATIENT_A, "launch/patient patient/*.rs")
    with probe.client() as http:
        secret = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)
        task = ok_json(http.post("Task", json=_completed_job_naming(secret["id"]), headers=admin), 201)
        answer = http.get(f"{probe.server.base_url}/$analyze-jobs/{task['id']}", headers=own)
        outcome(answer, 404, "not-found")
        assert "confidential finding" not in answer.text


# -- 2. running the model on another patient's study ----------------------------------------------


def test_requested_task_pointing_at_another_patients_study_is_refused(probe: Probe) -> None:
    admin, own = probe.admin_token(), probe.patient_token(PATIENT_A)
    with probe.client() as http:
        before = len(_reports_about(http, admin, STUDY_B))
        task = _analysis_task(PATIENT_A, "requested", focus={"reference": f"ImagingStudy/{STUDY_B}"})
        outcome(http.post("Task", json=task, headers=own), 422, "processing")
        time.sleep(1.5)  # five worklist polls
        assert len(_reports_about(http, admin, STUDY_B)) == before


def test_worklist_runs_a_task_with_its_requesters_rights(probe: Probe) -> None:
    """A client that may write Tasks but may not run `$analyze` (no read on ImagingStudy, no create on
    DiagnosticReport) cannot get the analysis run by requesting it: the worker checks the requester's
    rights when it acts, and fails the Task."""
    admin = probe.admin_token()
    tasks_only = probe.patient_token(PATIENT_A, "launch/patient patient/Task.cruds")
    with probe.client() as http:
        before = len(_reports_about(http, admin, STUDY_A))
        task = _analysis_task(PATIENT_A, "requested", focus={"reference": f"ImagingStudy/{STUDY_A}"})
        stored = ok_json(http.post("Task", json=task, headers=tasks_only), 201)
        done = _wait_for_status(http, stored["id"], admin)
        assert done["status"] == "failed", done
        assert "ImagingStudy" in done["statusReason"]["text"]
        assert len(_reports_about(http, admin, STUDY_A)) == before


def test_worklist_runs_an_allowed_requesters_task(probe: Probe) -> None:
    """The same check lets a requester with the rights `$analyze` needs through: the model runs."""
    admin = probe.admin_token()
    allowed = probe.patient_token(PATIENT_A)
    with probe.client() as http:
        task = _analysis_task(PATIENT_A, "requested", focus={"reference": f"ImagingStudy/{STUDY_A}"})
        stored = ok_json(http.post("Task", json=task, headers=allowed), 201)
        done = _wait_for_status(http, stored["id"], admin)
        assert done["status"] == "completed", done
        report_ref = done["output"][0]["valueReference"]["reference"]
        report = ok_json(http.get(report_ref, headers=allowed))
        assert report["subject"]["reference"] == f"Patient/{PATIENT_A}"


# -- 4. user/ scopes confined to the user's patients ---------------------------------------------


def test_user_scopes_reach_only_the_users_patients(probe: Probe) -> None:
    admin = probe.admin_token()
    alice = probe.user_token("alice", "openid fhirUser user/*.rs")
    with probe.client() as http:
        secret = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)
        own = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_A), headers=admin), 201)
        outcome(http.get(f"Patient/{PATIENT_B}", headers=alice), 404, "not-found")
        outcome(http.get(f"DiagnosticReport/{secret['id']}", headers=alice), 404, "not-found")
        assert ok_json(http.get(f"DiagnosticReport/{own['id']}", headers=alice))["id"] == own["id"]
        found = ok_json(http.get("DiagnosticReport", params={"_count": 200}, headers=alice))
        subjects = {e["resource"]["subject"]["reference"] for e in found.get("entry", [])}
        assert subjects == {f"Patient/{PATIENT_A}"}
        studies = ok_json(http.get("ImagingStudy", params={"_count": 200}, headers=alice))
        assert {e["resource"]["subject"]["reference"] for e in studies["entry"]} == {f"Patient/{PATIENT_A}"}
        dicomweb = httpx.get(f"{probe.root}/dicom-web/studies", headers=alice, timeout=30)
        assert dicomweb.status_code == 200, dicomweb.text
        assert {s["00100020"]["Value"][0] for s in dicomweb.json()} == {PATIENT_A}
        metadata = httpx.get(f"{probe.root}/dicom-web/studies/{STUDY_B}/metadata", headers=alice, timeout=30)
        assert metadata.status_code == 404


def test_user_without_patients_reaches_none_and_all_patients_user_reaches_all(probe: Probe) -> None:
    admin = probe.admin_token()
    nobody = probe.user_token("nobody", "user/*.rs")
    reader = probe.user_token("reader", "user/*.rs")
    with probe.client() as http:
        secret = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)
        outcome(http.get(f"DiagnosticReport/{secret['id']}", headers=nobody), 404, "not-found")
        assert ok_json(http.get("ImagingStudy", headers=nobody)).get("entry", []) == []
        assert ok_json(http.get(f"DiagnosticReport/{secret['id']}", headers=reader))["id"] == secret["id"]


def test_demo_registry_confines_the_demo_user(tmp_path: Path) -> None:
    registry = create_demo_registry(tmp_path / "auth-clients.json")
    assert registry.user_compartments(DEMO_USERNAME) == frozenset(DEMO_PATIENTS)
    assert registry.user_compartments("someone-removed") == frozenset()


# -- 9. small leaks ------------------------------------------------------------------------------


def test_deleted_and_unknown_and_not_yours_answer_alike(probe: Probe) -> None:
    admin, own = probe.admin_token(), probe.patient_token(PATIENT_A)
    with probe.client() as http:
        live = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)["id"]
        gone = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)["id"]
        assert http.delete(f"DiagnosticReport/{gone}", headers=admin).status_code in (200, 204)
        unknown = uuid.uuid4().hex
        for method in ("GET", "DELETE"):
            answers = []
            for resource_id in (live, gone, unknown):
                response = http.request(method, f"DiagnosticReport/{resource_id}", headers=own)
                body = outcome(response, 404, "not-found")
                answers.append(body["issue"][0]["diagnostics"].replace(resource_id, "ID"))
            assert len(set(answers)) == 1, (method, answers)
        history = [http.get(f"DiagnosticReport/{i}/_history", headers=own) for i in (live, gone, unknown)]
        assert [h.status_code for h in history] == [404, 404, 404]


def test_deleted_id_of_another_patient_cannot_be_taken_over(probe: Probe) -> None:
    admin, own = probe.admin_token(), probe.patient_token(PATIENT_A)
    with probe.client() as http:
        victim = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_B), headers=admin), 201)["id"]
        assert http.delete(f"DiagnosticReport/{victim}", headers=admin).status_code in (200, 204)
        takeover = {**_report(PATIENT_A), "id": victim}
        outcome(http.put(f"DiagnosticReport/{victim}", json=takeover, headers=own), 404, "not-found")
        outcome(http.get(f"DiagnosticReport/{victim}/_history", headers=own), 404, "not-found")
        # The id stays the victim's: its history is unchanged, and the patient's own ids still revive.
        history = ok_json(http.get(f"DiagnosticReport/{victim}/_history", headers=admin))
        assert history["total"] == 2
        mine = ok_json(http.post("DiagnosticReport", json=_report(PATIENT_A), headers=own), 201)["id"]
        assert http.delete(f"DiagnosticReport/{mine}", headers=own).status_code in (200, 204)
        revived = http.put(f"DiagnosticReport/{mine}", json={**_report(PATIENT_A), "id": mine}, headers=own)
        assert revived.status_code in (200, 201), revived.text


def test_idempotency_key_of_another_caller_is_not_found_nor_named(probe: Probe) -> None:
    key = f"probe-{uuid.uuid4().hex}"
    with probe.client() as http:
        theirs = http.post(
            f"ImagingStudy/{STUDY_B}/$analyze",
            headers={**probe.patient_token(PATIENT_B), "Idempotency-Key": key, "Prefer": "respond-async"},
        )
        assert theirs.status_code == 202, theirs.text
        mine = http.post(
            f"ImagingStudy/{STUDY_A}/$analyze",
            headers={**probe.patient_token(PATIENT_A), "Idempotency-Key": key, "Prefer": "respond-async"},
        )
        assert mine.status_code == 202, mine.text
        assert STUDY_B not in mine.text and STUDY_B not in str(mine.headers)
        assert mine.headers["x-analysis-task"] != theirs.headers["x-analysis-task"]


# -- 3. STOW-RS framing ---------------------------------------------------------------------------


def test_stow_preamble_cannot_smuggle_an_instance_into_another_patients_study(
    probe: Probe, loaded_orthanc: EmbeddedOrthanc
) -> None:
    """`X--BND` is no delimiter (RFC 2046 5.1.1): the facade's parser skipped the part behind it as
    preamble while Orthanc stored it, into PROBE-B's study. Whatever the facade checks must be what
    the PACS receives (ADR 0014)."""
    intruder = new_study(PATIENT_B, study_uid=STUDY_B)[0]
    intruder.SeriesInstanceUID = generate_uid(CORPUS_ROOT)
    intruder.SOPInstanceUID = intruder.file_meta.MediaStorageSOPInstanceUID = generate_uid(CORPUS_ROOT)
    own = new_study(PATIENT_A)[0]
    part = b"Content-Type: application/dicom\r\n\r\n"
    body = (
        b"X--BND\r\n" + part + to_bytes(intruder)
        + b"\r\n--BND\r\n" + part + to_bytes(own)
        + b"\r\n--BND--\r\n"
    )  # fmt: skip

    def sops_of_b() -> set[str]:
        found = httpx.get(f"{loaded_orthanc.dicomweb_url}/studies/{STUDY_B}/instances", timeout=30)
        return {ds["00080018"]["Value"][0] for ds in found.json()}

    before = sops_of_b()
    response = httpx.post(
        f"{probe.root}/dicom-web/studies",
        content=body,
        headers={
            **probe.patient_token(PATIENT_A),
            "Accept": "application/dicom+json",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=BND',
        },
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert sops_of_b() == before
    assert str(intruder.SOPInstanceUID) not in sops_of_b()
