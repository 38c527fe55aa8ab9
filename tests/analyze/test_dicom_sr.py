"""The AI result as a Comprehensive 3D SR (TID 1500), and its STOW-RS write-back to the real Orthanc.

The SR is built over a copy of the demo MR series (the Colin27 brain) with its own UIDs, stored in
the session's Orthanc, so these tests add no SR series to the demo study that the `$analyze`
tests inspect.
"""

from __future__ import annotations

import copy
import io
from collections.abc import AsyncIterator

import highdicom as hd
import httpx
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset, FileDataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, SecondaryCaptureImageStorage, generate_uid

from fhir_facade.analyze.dicom_sr import (
    COMPREHENSIVE_3D_SR,
    PATIENT_STUDY_KEYWORDS,
    build_analysis_sr,
    evidence_header,
    sr_retrieve_url,
)
from fhir_facade.analyze.result import AnalysisResult, CodedConcept, ScoredInstance, StudyDecision
from fhir_facade.demo.brain_mri import DEMO_STUDY_UID, build_demo_study
from fhir_facade.dicomweb.client import DicomwebClient, DicomwebUnavailable
from fhir_facade.dicomweb.stow import StowClient, StowRejected
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.embedded.orthanc import store_instances

STUDY_UID = f"{DEMO_STUDY_UID}.5501"
SERIES_UID = f"{STUDY_UID}.1"
PATIENT_ID = "DEMO-SR-TEST"
LABELS = ("glioma", "meningioma", "notumor", "pituitary")
SCT = "http://snomed.info/sct"
# Test data: the targets of mappings/ConceptMap-brain-tumor-vgg16-labels.json.
CONCEPTS = {
    "glioma": CodedConcept(SCT, "393564001", "Glioma of brain"),
    "meningioma": CodedConcept(SCT, "302820008", "Intracranial meningioma"),
    "notumor": CodedConcept(SCT, "281900007", "No abnormality detected"),
    "pituitary": CodedConcept(SCT, "254956000", "Pituitary adenoma"),
}
SCORES = {"glioma": 0.81, "meningioma": 0.11, "notumor": 0.05, "pituitary": 0.03}
N_SLICES = 6


@pytest.fixture(scope="module")
def study() -> list[FileDataset]:
    """The demo MR series under this module's own study, series and instance UIDs."""
    datasets = build_demo_study(N_SLICES)
    for ds in datasets:
        sop_uid = UID(f"{SERIES_UID}.{ds.InstanceNumber}")
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = SERIES_UID
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.PatientID = PATIENT_ID
        ds.AccessionNumber = "DEMO-SR-ACC"
    return datasets


@pytest.fixture(scope="module")
def stored_study(orthanc: EmbeddedOrthanc, study: list[FileDataset]) -> EmbeddedOrthanc:
    with httpx.Client(timeout=30) as client:
        store_instances(client, orthanc.url, study)
    return orthanc


@pytest.fixture(scope="module")
def result(study: list[FileDataset]) -> AnalysisResult:
    instances = tuple(
        ScoredInstance(
            series_uid=SERIES_UID,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            instance_number=int(ds.InstanceNumber),
            probabilities=tuple(SCORES[label] for label in LABELS),
        )
        for ds in study
    )
    decision = StudyDecision(
        label="glioma",
        concept=CONCEPTS["glioma"],
        probability=SCORES["glioma"],
        class_scores=dict(SCORES),
        class_concepts=dict(CONCEPTS),
        method="max-positive-slice",
        supporting=instances[2:4],
    )
    return AnalysisResult(
        study_uid=STUDY_UID,
        model_id="brain-tumor-vgg16",
        model_version="0.1.1",
        model_title="Brain MRI tumour classifier (VGG16, 4 classes)",
        model_sha256="3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49",
        labels=LABELS,
        instances=instances,
        decision=decision,
    )


@pytest.fixture(scope="module")
def headers(study: list[FileDataset]) -> list[Dataset]:
    return [evidence_header(ds) for ds in study]


def _build(result: AnalysisResult, evidence: list[Dataset]) -> Dataset:
    return build_analysis_sr(result, evidence, series_uid=generate_uid(), sop_instance_uid=generate_uid())


@pytest.fixture(scope="module")
def sr(result: AnalysisResult, headers: list[Dataset]) -> Dataset:
    return _build(result, headers)


def _roundtrip(ds: Dataset) -> pydicom.FileDataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _code(concept: CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.code, concept.dicom_scheme, concept.display)


# --- the SR document ------------------------------------------------------------------------------


def test_sr_is_a_preliminary_comprehensive_3d_sr_of_the_source_study(
    sr: Dataset, study: list[FileDataset]
) -> None:
    ds = _roundtrip(sr)
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.file_meta.MediaStorageSOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.Modality == "SR"
    assert ds.SeriesNumber == 9901
    assert ds.SeriesInstanceUID != SERIES_UID
    # Nobody signed it: partial, unverified, preliminary.
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert "VerifyingObserverSequence" not in ds
    # Same Patient and Study modules: Orthanc files it as a new series of the analysed study.
    source = study[0]
    for keyword in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "ReferringPhysicianName",
    ):
        assert ds[keyword].value == source[keyword].value, keyword
    assert ds.StudyInstanceUID == STUDY_UID and ds.PatientID == PATIENT_ID
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ContentTemplateSequence[0].MappingResource == "DCMR"


def test_sr_references_every_evaluated_instance(
    sr: Dataset, result: AnalysisResult, study: list[FileDataset]
) -> None:
    ds = _roundtrip(sr)
    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == STUDY_UID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == SERIES_UID
    referenced = {
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence
    }
    assert referenced == {(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in study}
    assert "PertinentOtherEvidenceSequence" not in ds
    # The image library (TID 1600) lists the images the measurements refer to, each once.
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    library = find_content_items(report[0], name=codes.DCM.ImageLibrary, recursive=True)
    images = find_content_items(library[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert sorted(item.referenced_sop_instance_uid for item in images) == sorted(
        {item.sop_instance_uid for item in result.decision.supporting}
    )


def test_highdicom_reads_the_finding_scores_and_algorithm_back(
    sr: Dataset, result: AnalysisResult, headers: list[Dataset]
) -> None:
    parsed = hd.sr.Comprehensive3DSR.from_dataset(_roundtrip(sr))
    report = parsed.content
    assert isinstance(report, hd.sr.MeasurementReport)
    root = report[0]
    assert root.name == codes.DCM.ImagingMeasurementReport
    (procedure,) = find_content_items(root, name=codes.DCM.ProcedureReported)
    assert procedure.value == hd.sr.CodedConcept("24590-2", "LN", "Brain MRI")

    # Observer: the algorithm as a device, identified by the model file.
    (observer_type,) = find_content_items(root, name=codes.DCM.ObserverType)
    assert observer_type.value == codes.DCM.Device
    (device_name,) = find_content_items(root, name=codes.DCM.DeviceObserverName)
    assert device_name.value == result.model_title
    (device_uid,) = find_content_items(root, name=codes.DCM.DeviceObserverUID)
    other_report = hd.sr.Comprehensive3DSR.from_dataset(_build(result, headers)).content
    (same_uid,) = find_content_items(other_report[0], name=codes.DCM.DeviceObserverUID)
    assert device_uid.value == same_uid.value, "one device UID per model file, whatever the SR"

    (group,) = report.get_image_measurement_groups()
    assert group.tracking_identifier == "brain-tumor-vgg16 study classification"
    # The finding: TID 1501 row "Finding" (DCM 121071), whose value is the decision concept.
    expected = _code(result.decision.concept)
    assert group.finding_type == expected
    (finding_item,) = find_content_items(group[0], name=codes.DCM.Finding)
    evaluation = hd.sr.QualitativeEvaluation.from_sequence([finding_item])
    assert evaluation.name == codes.DCM.Finding
    assert evaluation.value == expected
    assert finding_item.value.value == "393564001" and finding_item.value.scheme_designator == "SCT"

    (name,) = find_content_items(group[0], name=codes.DCM.AlgorithmName)
    (version,) = find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
    assert (name.value, version.value) == ("brain-tumor-vgg16", "0.1.1")
    parameters = [item.value for item in find_content_items(group[0], name=codes.DCM.AlgorithmParameters)]
    assert f"model sha256: {result.model_sha256}" in parameters

    measurements = group.get_measurements()
    assert [(m.name, m.value) for m in measurements] == [
        (_code(CONCEPTS[label]), pytest.approx(SCORES[label])) for label in LABELS
    ]
    assert {(m.unit.value, m.unit.scheme_designator) for m in measurements} == {("{probability}", "UCUM")}

    assert [image.referenced_sop_instance_uid for image in group.source_images] == [
        item.sop_instance_uid for item in result.decision.supporting
    ]


def test_evidence_header_keeps_only_what_the_sr_needs(study: list[FileDataset]) -> None:
    header = evidence_header(study[0])
    assert "PixelData" not in header
    assert header.SOPInstanceUID == study[0].SOPInstanceUID
    assert header.PatientID == PATIENT_ID and header.StudyInstanceUID == STUDY_UID
    assert header.ImagePositionPatient == study[0].ImagePositionPatient
    # Type 2 attributes the demo study leaves out are added empty (PS3.3 Type 2).
    assert "PatientBirthDate" not in study[0]
    assert header.PatientBirthDate in (None, "")
    assert len(header) < 60


def test_sr_from_full_datasets_equals_sr_from_headers(
    result: AnalysisResult, study: list[FileDataset], headers: list[Dataset]
) -> None:
    from_headers = build_analysis_sr(result, headers, series_uid="1.2.3.4.5", sop_instance_uid="1.2.3.4.5.1")
    from_full = build_analysis_sr(result, study, series_uid="1.2.3.4.5", sop_instance_uid="1.2.3.4.5.1")
    assert from_full.ContentSequence == from_headers.ContentSequence
    assert (
        from_full.CurrentRequestedProcedureEvidenceSequence
        == from_headers.CurrentRequestedProcedureEvidenceSequence
    )


def test_patient_study_keywords_are_highdicoms_patient_and_study_modules() -> None:
    # highdicom's module tables are private API: this only guards our copy against drift.
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map()[COMPREHENSIVE_3D_SR]
    modules = [m["key"] for m in get_iod_module_map()[iod] if m["ie"] in ("Patient", "Study")]
    expected = {
        item["keyword"] for key in modules for item in get_module_attribute_map()[key] if not item["path"]
    }
    assert set(PATIENT_STUDY_KEYWORDS) == expected


def test_image_without_geometry_is_left_out_of_the_library(
    result: AnalysisResult, headers: list[Dataset]
) -> None:
    trimmed = copy.deepcopy(headers)
    supporting = {item.sop_instance_uid for item in result.decision.supporting}
    geometry_less = next(h for h in trimmed if str(h.SOPInstanceUID) in supporting)
    del geometry_less.SliceThickness
    ds = _build(result, trimmed)
    library = find_content_items(
        hd.sr.Comprehensive3DSR.from_dataset(ds).content[0], name=codes.DCM.ImageLibrary, recursive=True
    )
    images = find_content_items(library[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert len(images) == len(supporting) - 1
    # It is still recorded as evidence.
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(series.ReferencedSOPSequence) == N_SLICES


def test_evidence_of_another_study_is_refused(result: AnalysisResult, headers: list[Dataset]) -> None:
    other = copy.deepcopy(headers[0])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="other studies"):
        _build(result, [*headers, other])


def test_missing_evidence_for_an_evaluated_image_is_refused(
    result: AnalysisResult, headers: list[Dataset]
) -> None:
    with pytest.raises(ValueError, match=r"evidence lacks evaluated/supporting instances"):
        _build(result, headers[:-1])


def test_evidence_without_identity_is_refused(headers: list[Dataset]) -> None:
    anonymous = copy.deepcopy(headers[0])
    del anonymous.SeriesInstanceUID
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        evidence_header(anonymous)


def test_invalid_sr_uid_is_refused(result: AnalysisResult, headers: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid is not a valid DICOM UID"):
        # 65 characters: one over PS3.5 9.1's limit (generate_uid() + ".1" is only sometimes too long)
        build_analysis_sr(result, headers, series_uid=generate_uid(), sop_instance_uid="1.2." + "3" * 61)


def test_sr_retrieve_url() -> None:
    assert sr_retrieve_url("http://pacs/dicom-web/", "1.2", "1.2.3", "1.2.3.4") == (
        "http://pacs/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"
    )


# --- STOW-RS to the real Orthanc ------------------------------------------------------------------


@pytest.fixture
async def stow(stored_study: EmbeddedOrthanc) -> AsyncIterator[StowClient]:
    client = StowClient(stored_study.dicomweb_url, timeout=30)
    await client.open()
    yield client
    await client.close()


def _multipart_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related WADO-RS answer (RFC 2046)."""
    content_type = response.headers["content-type"]
    boundary = next(
        param.split("=", 1)[1].strip('"')
        for param in content_type.split(";")
        if param.strip().startswith("boundary=")
    )
    parts = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body.removesuffix(b"\r\n"))
    return parts


async def test_stow_files_the_sr_as_a_new_series_of_the_study(
    stow: StowClient, stored_study: EmbeddedOrthanc, sr: Dataset
) -> None:
    result = await stow.store([sr], study_uid=STUDY_UID)

    (stored,) = result.stored
    assert result.status == 200 and not result.failed and not result.unreported
    assert (stored.sop_class_uid, stored.sop_instance_uid) == (COMPREHENSIVE_3D_SR, sr.SOPInstanceUID)
    url = sr_retrieve_url(stored_study.dicomweb_url, STUDY_UID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert stored.retrieve_url == url
    assert result.retrieve_url == f"{stored_study.dicomweb_url}/studies/{STUDY_UID}"

    qido = DicomwebClient(stored_study.dicomweb_url, timeout=30, max_connections=2)
    try:
        series = await qido.search_series({"StudyInstanceUID": STUDY_UID})
    finally:
        await qido.close()
    by_uid = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in series}
    assert by_uid == {SERIES_UID: "MR", sr.SeriesInstanceUID: "SR"}

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200
    (part,) = _multipart_parts(response)
    retrieved = pydicom.dcmread(io.BytesIO(part))
    assert retrieved.SOPInstanceUID == sr.SOPInstanceUID
    assert retrieved.SOPClassUID == COMPREHENSIVE_3D_SR
    assert retrieved.ContentSequence == sr.ContentSequence

    # A retried write-back of the same instance is answered as stored again, not duplicated.
    again = await stow.store([sr], study_uid=STUDY_UID)
    assert [s.sop_instance_uid for s in again.stored] == [sr.SOPInstanceUID]


async def test_stow_into_another_study_is_rejected_with_the_reason(stow: StowClient, sr: Dataset) -> None:
    with pytest.raises(StowRejected) as caught:
        await stow.store([sr], study_uid="1.2.826.0.1.3680043.8.498.1")
    # Orthanc: 409 with FailedSOPSequence, Failure Reason 0x0110 "Processing failure".
    assert caught.value.status == 409
    assert caught.value.reasons == (0x0110,)
    assert caught.value.failed[0].sop_instance_uid == sr.SOPInstanceUID
    assert not caught.value.result.stored
    assert "0x0110 Processing failure" in str(caught.value)


def _malformed() -> Dataset:
    """An instance with SOP identity only: no Patient, Study or Series (Orthanc needs them)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    return ds


async def test_stow_of_a_malformed_dataset_is_rejected(stow: StowClient) -> None:
    malformed = _malformed()
    with pytest.raises(StowRejected) as caught:
        await stow.store([malformed])
    # Orthanc: 400, Failure Reason 0xC000 "Cannot understand".
    assert caught.value.status == 400
    assert caught.value.reasons == (0xC000,)
    assert caught.value.failed[0].sop_instance_uid == malformed.SOPInstanceUID


async def test_partial_failure_is_rejected_and_says_what_was_stored(stow: StowClient, sr: Dataset) -> None:
    malformed = _malformed()
    with pytest.raises(StowRejected) as caught:
        await stow.store([sr, malformed])
    # Orthanc stores the good instance and answers 400 for the request.
    assert caught.value.status == 400
    assert [s.sop_instance_uid for s in caught.value.result.stored] == [sr.SOPInstanceUID]
    assert [(f.sop_instance_uid, f.reason) for f in caught.value.failed] == [
        (malformed.SOPInstanceUID, 0xC000)
    ]


async def test_stow_to_an_unreachable_pacs_is_unavailable(sr: Dataset) -> None:
    client = StowClient(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5)
    try:
        with pytest.raises(DicomwebUnavailable, match="unreachable"):
            await client.store([sr])
    finally:
        await client.close()


async def test_stow_of_nothing_is_a_caller_error(stow: StowClient) -> None:
    with pytest.raises(ValueError, match="datasets must not be empty"):
        await stow.store([])


# Faults the real Orthanc cannot be made to produce on demand: a 5xx, and a 200 that lists nothing
# (what Orthanc answers when the body's boundary does not match the header, checked by hand). The
# one place these tests use a fake transport.
@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (503, b"", DicomwebUnavailable),
        (200, b'{"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}', StowRejected),
    ],
)
async def test_faults_orthanc_cannot_be_made_to_produce(
    sr: Dataset, status: int, body: bytes, expected: type[Exception]
) -> None:
    fake_pacs: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        fake_pacs.append(request)
        return httpx.Response(status, content=body, headers={"Content-Type": "application/dicom+json"})

    async with StowClient("http://pacs.invalid/dicom-web", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(expected) as caught:
            await client.store([sr])
    if isinstance(caught.value, StowRejected):
        assert caught.value.result.unreported == (sr.SOPInstanceUID,)
    # The request is a well-formed multipart/related with one application/dicom part.
    (request,) = fake_pacs
    content_type = request.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("=", 1)[1]
    assert request.content.startswith(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    assert request.content.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert b"DICM" in request.content[:300]


class TestApplicabilityAndPredecessors:
    """ADR 0031: excluded images as content items, the not-assessed finding, predecessors."""

    def test_each_excluded_image_is_a_qualitative_evaluation_with_its_image(
        self, result: AnalysisResult, headers: list[Dataset]
    ) -> None:
        from dataclasses import replace

        from fhir_facade.analyze.codes import applicability_concept
        from fhir_facade.analyze.result import ExcludedInstance

        excluded = (
            ExcludedInstance(
                result.instances[0], applicability_concept("skull-base-level"), "at 0 % of the extent"
            ),
            ExcludedInstance(
                result.instances[5], applicability_concept("partial-section"), "tissue area 51 %"
            ),
        )
        sr = build_analysis_sr(
            replace(result, excluded=excluded),
            headers,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        )
        items = find_content_items(
            sr, name=hd.sr.CodedConcept("not-assessed", "99FHIRFACADE", "x"), recursive=True
        )
        assert [item.ConceptCodeSequence[0].CodeValue for item in items] == [
            "skull-base-level",
            "partial-section",
        ]
        for item, expected in zip(items, excluded, strict=True):
            image = next(c for c in item.ContentSequence if c.ValueType == "IMAGE")
            assert image.RelationshipType == "INFERRED FROM"
            assert (
                image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == expected.instance.sop_instance_uid
            )
            text = next(c for c in item.ContentSequence if c.ValueType == "TEXT")
            assert text.TextValue == f"{expected.instance.instance_number}: {expected.detail}"

    def test_no_assessed_image_gives_an_undetermined_finding_without_scores(
        self, result: AnalysisResult, headers: list[Dataset]
    ) -> None:
        from dataclasses import replace

        from fhir_facade.analyze.decision import not_assessed

        decision = not_assessed(LABELS, CONCEPTS, len(result.instances))
        sr = build_analysis_sr(
            replace(result, decision=decision),
            headers,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        )
        findings = find_content_items(sr, name=codes.DCM.Finding, recursive=True)
        assert [f.ConceptCodeSequence[0].CodeValue for f in findings] == ["373068000"]
        assert not find_content_items(sr, value_type=hd.sr.ValueTypeValues.NUM, recursive=True)
        assert (
            len(
                sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0]
                .ReferencedSOPSequence
            )
            == 6
        )

    def test_predecessors_are_listed(self, result: AnalysisResult, headers: list[Dataset]) -> None:
        from fhir_facade.analyze.result import PreviousSr

        previous = PreviousSr(STUDY_UID, "1.2.3.9901", "1.2.3.9901.1")
        sr = build_analysis_sr(
            result,
            headers,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            predecessors=[previous],
        )
        [item] = sr.PredecessorDocumentsSequence
        assert item.StudyInstanceUID == STUDY_UID
        [series] = item.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == "1.2.3.9901"
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.9901.1"
        assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == COMPREHENSIVE_3D_SR
        plain = build_analysis_sr(result, headers, series_uid=generate_uid(), sop_instance_uid=generate_uid())
        assert "PredecessorDocumentsSequence" not in plain
