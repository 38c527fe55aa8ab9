"""Query/retrieve from a remote DICOM node (ADR 0041), with real parts: a second real Orthanc is the
remote node (its own AE title and ports, the local Orthanc in its DicomModalities), the local
Orthanc queries it (C-FIND) and has it send a study (C-MOVE); the facade watches the local Orthanc,
so the retrieved study arrives like any other (arrival Task). A SMART-secured facade on the same
Orthanc checks that a patient-confined token sees only its patient's remote studies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.dicom_to_fhir import patient_resource_id
from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from fhir_facade.embedded.remote_nodes import RemoteNode
from fhir_facade.remote_pacs.search import c_find_queries, remote_study_id
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, upload
from tests.facade_process import wait_for

FHIR_JSON = {"Content-Type": "application/fhir+json"}
REMOTE_AET, LOCAL_AET = "REMOTEPACS", "LOCALPACS"
MR_UID = "1.2.826.0.1.3680043.8.498.91.1"
MR2_UID = "1.2.826.0.1.3680043.8.498.91.2"
CT_UID = "1.2.826.0.1.3680043.8.498.91.3"
OWN, OTHER = "RQ-1", "RQ-2"


def _study(uid: str, patient: str, modality: str, date: str, instances: int) -> StudySpec:
    return StudySpec(
        patient_id=patient,
        patient_name=f"Remote^{patient}",
        study_uid=uid,
        accession=f"ACC-{uid[-1]}",
        study_date=date,
        study_time="093000",
        description=f"{modality} at the other PACS",
        series=[SeriesSpec(modality, "AX", 1, body_part="HEAD", n_instances=instances)],
    )


STUDIES = [
    _study(MR_UID, OWN, "MR", "20240301", 4),
    _study(MR2_UID, OWN, "MR", "20240302", 1),
    _study(CT_UID, OTHER, "CT", "20240303", 2),
]


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"local": free_port(), "remote": free_port(), "closed": free_port()}


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[EmbeddedOrthanc]:
    """The other PACS: it lets the local Orthanc (its AE title, from 127.0.0.1) query and move."""
    local = {
        "AET": LOCAL_AET,
        "Host": "127.0.0.1",
        "Port": ports["local"],
        "AllowEcho": True,
        "AllowFind": True,
        "AllowMove": True,
        "AllowGet": False,
        "AllowStore": False,
    }
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-remote"),
        http_port=free_port(),
        dicom_port=ports["remote"],
        aet=REMOTE_AET,
        http_auth=False,
        extra_config={"DicomModalities": {"local": local}},
    ) as instance:
        with httpx.Client(timeout=30) as client:
            for spec in STUDIES:
                upload(client, instance.url, build_study(spec))
        yield instance


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int], remote: EmbeddedOrthanc
) -> Iterator[EmbeddedOrthanc]:
    node = RemoteNode("pacs2", DicomPeer(REMOTE_AET, "127.0.0.1", ports["remote"]))
    offline = RemoteNode("offline", DicomPeer("NOBODY", "127.0.0.1", ports["closed"]))
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-local"),
        http_port=free_port(),
        dicom_port=ports["local"],
        aet=LOCAL_AET,
        stable_age=1,
        http_auth=False,
        remote_nodes=[node, offline],
    ) as instance:
        yield instance


def _settings(local: EmbeddedOrthanc, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "dicomweb_url": local.dicomweb_url,
        "orthanc_url": local.url,
        "remote_pacs_nodes": [
            f"pacs2={REMOTE_AET}@127.0.0.1:{ports['remote']}",
            f"offline=NOBODY@127.0.0.1:{ports['closed']}",
        ],
        "remote_pacs_local_aet": LOCAL_AET,
    }


@pytest.fixture(scope="module")
def fhir(local: EmbeddedOrthanc, ports: dict[str, int]) -> Iterator[httpx.Client]:
    settings = {**_settings(local, ports), "watch_studies": True, "watch_poll_interval": 0.3}
    with serve(settings) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def issuer() -> Iterator[tuple[TestIssuer, int]]:
    port = free_port()
    test_issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    yield test_issuer, port
    test_issuer.close()


@pytest.fixture(scope="module")
def secured(
    local: EmbeddedOrthanc, ports: dict[str, int], issuer: tuple[TestIssuer, int]
) -> Iterator[LiveServer]:
    test_issuer, port = issuer
    with serve({**_settings(local, ports), **test_issuer.facade_settings}, port=port) as server:
        yield server


def _studies(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Remote studies by Study UID."""
    found = {}
    for entry in bundle.get("entry", []):
        study = entry["resource"]
        uid = next(i["value"] for i in study["identifier"] if i["system"] == "urn:dicom:uid")
        found[uid.removeprefix("urn:oid:")] = study
    return found


def test_search_says_where_each_study_lives(fhir: httpx.Client) -> None:
    bundle = ok_json(fhir.get("/ImagingStudy/$query-remote", params={"node": "pacs2"}))
    studies = _studies(bundle)
    assert set(studies) == {MR_UID, MR2_UID, CT_UID}
    assert bundle["total"] == 3
    mr = studies[MR_UID]
    assert mr["id"] == remote_study_id("pacs2", MR_UID) and "." not in mr["id"]  # never a local id
    assert {"system": "http://fhir-facade.org/fhir/CodeSystem/study-location", "code": "remote"}.items() <= (
        mr["meta"]["tag"][0].items()
    )
    assert mr["endpoint"][0]["reference"] == "Endpoint/remote-pacs-pacs2"
    assert mr["subject"]["reference"] == f"Patient/{patient_resource_id(OWN, None)}"
    assert mr["numberOfInstances"] == 4 and mr["modality"][0]["code"] == "MR"
    endpoint = ok_json(fhir.get("/Endpoint/remote-pacs-pacs2"))
    assert endpoint["connectionType"]["code"] == "dicom-dimse"
    assert endpoint["address"].startswith(f"dicom://{REMOTE_AET}@127.0.0.1:")
    # Not in the local PACS (yet): the local ImagingStudy is not there.
    outcome(fhir.get(f"/ImagingStudy/{CT_UID}"), 404, "not-found")


def test_search_parameters_become_the_c_find(fhir: httpx.Client) -> None:
    own = f"Patient/{patient_resource_id(OWN, None)}"
    by_patient = ok_json(fhir.get("/ImagingStudy/$query-remote", params={"node": "pacs2", "patient": own}))
    assert set(_studies(by_patient)) == {MR_UID, MR2_UID}
    both = f"{own},Patient/{patient_resource_id(OTHER, None)}"  # two C-FINDs: PatientID has no lists
    by_patients = ok_json(fhir.get("/ImagingStudy/$query-remote", params={"node": "pacs2", "patient": both}))
    assert set(_studies(by_patients)) == {MR_UID, MR2_UID, CT_UID}
    by_modality = ok_json(fhir.get("/ImagingStudy/$query-remote", params={"node": "pacs2", "modality": "CT"}))
    assert set(_studies(by_modality)) == {CT_UID}
    by_date = ok_json(
        fhir.get("/ImagingStudy/$query-remote", params={"node": "pacs2", "started": "ge2024-03-02"})
    )
    assert set(_studies(by_date)) == {MR2_UID, CT_UID}
    posted = ok_json(
        fhir.post(
            "/ImagingStudy/$query-remote",
            headers=FHIR_JSON,
            json={
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "node", "valueString": "pacs2"},
                    {"name": "identifier", "valueString": "ACC-2"},
                ],
            },
        )
    )
    assert set(_studies(posted)) == {MR2_UID}


def test_only_configured_nodes(fhir: httpx.Client) -> None:
    outcome(fhir.get("/ImagingStudy/$query-remote", params={"node": "elsewhere"}), 400, "not-found")
    outcome(fhir.get("/ImagingStudy/$query-remote"), 400, "invalid")
    outcome(
        fhir.get("/ImagingStudy/$query-remote", params={"node": "pacs2", "bogus": "1"}), 400, "not-supported"
    )
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "node", "valueString": "10.0.0.1:104"},
            {"name": "study", "valueString": MR_UID},
        ],
    }
    outcome(fhir.post("/ImagingStudy/$retrieve-remote", headers=FHIR_JSON, json=body), 400, "not-found")
    unknown_study = {
        "resourceType": "Parameters",
        "parameter": [{"name": "node", "valueString": "pacs2"}, {"name": "study", "valueString": "1.2.3.4"}],
    }
    outcome(
        fhir.post("/ImagingStudy/$retrieve-remote", headers=FHIR_JSON, json=unknown_study), 404, "not-found"
    )


def test_unreachable_node_is_an_outcome_not_a_500(fhir: httpx.Client) -> None:
    """A configured node that does not answer (nothing listens on its port)."""
    response = fhir.get("/ImagingStudy/$query-remote", params={"node": "offline"})
    body = outcome(response, 503, "transient")
    assert body["issue"][0]["details"]["coding"][0]["code"] == "dicom_service_unavailable"


def test_retrieve_is_a_task_with_progress_then_an_arrival(fhir: httpx.Client) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "node", "valueString": "pacs2"}, {"name": "study", "valueString": MR_UID}],
    }
    started = time.monotonic()
    response = fhir.post("/ImagingStudy/$retrieve-remote", headers=FHIR_JSON, json=body)
    assert response.status_code == 202, response.text
    status_url = response.headers["content-location"]
    task_ref = response.headers["x-retrieve-task"]
    progress: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        poll = fhir.get(status_url)
        if poll.status_code != 202:
            break
        progress.append(poll.headers["x-progress"])
        assert time.monotonic() < deadline, progress
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    done = ok_json(poll)
    assert done["type"] == "batch-response"
    study = done["entry"][0]["resource"]
    assert study["id"] == MR_UID and study["numberOfInstances"] == 4
    assert "meta" not in study or "tag" not in study.get("meta", {})  # now a local study
    ok_json(fhir.get(f"/ImagingStudy/{MR_UID}"))
    task = ok_json(fhir.get(f"/{task_ref}"))
    assert task["status"] == "completed"
    assert task["code"]["coding"][0]["code"] == "retrieve"
    assert task["businessStatus"]["text"] == "4 of 4 instances in the local PACS (100%)"
    assert task["output"][0]["valueReference"]["reference"] == f"ImagingStudy/{MR_UID}"
    assert task["identifier"][0]["system"] == "http://fhir-facade.org/fhir/sid/orthanc-job"
    assert task["for"]["reference"] == f"Patient/{patient_resource_id(OWN, None)}"
    print(f"retrieve of 4 instances: {elapsed:.2f} s; progress seen: {progress}")

    def arrival() -> list[dict[str, Any]]:
        bundle = ok_json(fhir.get("/Task", params={"identifier": f"urn:dicom:uid|urn:oid:{MR_UID}"}))
        return [e["resource"] for e in bundle.get("entry", [])]

    arrived = wait_for(arrival, timeout=30)
    assert arrived[0]["focus"]["reference"] == f"ImagingStudy/{MR_UID}"


def test_confined_caller_sees_only_its_patients_remote_studies(
    secured: LiveServer, issuer: tuple[TestIssuer, int]
) -> None:
    test_issuer, _ = issuer
    headers = {
        **FHIR_JSON,
        **test_issuer.headers("launch/patient patient/*.cruds", patient=patient_resource_id(OWN, None)),
    }
    with httpx.Client(base_url=secured.base_url, timeout=30, headers=headers) as client:
        everything = ok_json(client.get("/ImagingStudy/$query-remote", params={"node": "pacs2"}))
        assert set(_studies(everything)) == {MR_UID, MR2_UID}
        other = f"Patient/{patient_resource_id(OTHER, None)}"
        asked = ok_json(client.get("/ImagingStudy/$query-remote", params={"node": "pacs2", "patient": other}))
        assert _studies(asked) == {}
        body = {
            "resourceType": "Parameters",
            "parameter": [{"name": "node", "valueString": "pacs2"}, {"name": "study", "valueString": CT_UID}],
        }
        outcome(client.post("/ImagingStudy/$retrieve-remote", json=body), 404, "not-found")
    outcome(
        httpx.get(f"{secured.base_url}/ImagingStudy/$query-remote", params={"node": "pacs2"}), 401, "login"
    )


def test_capability_statement_declares_the_operations(fhir: httpx.Client) -> None:
    statement = ok_json(fhir.get("/metadata"))
    study = next(r for r in statement["rest"][0]["resource"] if r["type"] == "ImagingStudy")
    declared = {o["name"]: o["definition"] for o in study.get("operation", [])}
    for name in ("query-remote", "retrieve-remote"):
        definition = ok_json(fhir.get(f"/OperationDefinition/{name}"))
        assert declared[name] == definition["url"]
        assert definition["code"] == name and definition["resource"] == ["ImagingStudy"]
    ok_json(fhir.get("/CodeSystem/study-location"))


def test_c_find_lists_only_for_uids() -> None:
    queries = c_find_queries({"PatientID": "A\\B", "StudyInstanceUID": "1.2\\1.3", "ModalitiesInStudy": "MR"})
    assert queries == [
        {"PatientID": "A", "StudyInstanceUID": "1.2\\1.3", "ModalitiesInStudy": "MR"},
        {"PatientID": "B", "StudyInstanceUID": "1.2\\1.3", "ModalitiesInStudy": "MR"},
    ]
