"""The saliency map of `$analyze` end to end (ADR 0035): real Orthanc, the real model on ONNX
Runtime, the Parametric Map stored over STOW-RS, referenced from the SR and the report.

The study: 8 slices of the demo brain (Colin27) analysed with the applicability step off, so
that the skull-base slice the model calls "meningioma" (ADR 0031's table) counts: the only
positive result the project's images give. Occlusion with 80-pixel squares every 40 pixels
(25 occluded copies) keeps the module at about a minute on two shared cores."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from fhir_facade.analyze.codes import label_concepts
from fhir_facade.analyze.dicom_sr import SALIENCY_MAP_CONCEPT, SALIENCY_REGION_CONCEPT
from fhir_facade.analyze.inference import OnnxRuntimeBackend
from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.analyze.saliency_dicom import PARAMETRIC_MAP_STORAGE
from fhir_facade.analyze.saliency_seg import HALF_MAXIMUM, SEGMENT_LABEL, SEGMENTATION_STORAGE
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from tests.conftest import LiveServer, ok_json, serve, validate
from tests.dicom_factory import demo_brain_study

STUDY_UID = "1.2.826.0.1.3680043.8.498.727.9201"
OFF_STUDY_UID = "1.2.826.0.1.3680043.8.498.727.9202"
N_SLICES = 8
MANIFEST = load_manifests()["brain-tumor-vgg16"]
MENINGIOMA_SNOMED = label_concepts(MANIFEST)["meningioma"].code


def _settings(orthanc: EmbeddedOrthanc, saliency: bool) -> dict[str, Any]:
    return {
        "dicomweb_url": orthanc.dicomweb_url,
        "orthanc_url": orthanc.url,
        "analyze_enabled": True,
        "analyze_worklist": False,
        "analyze_slice_applicability": False,
        "analyze_saliency": saliency,
        "analyze_saliency_patch": 80,
        "analyze_saliency_stride": 40,
    }


@pytest.fixture(scope="module")
def studies(orthanc: EmbeddedOrthanc) -> EmbeddedOrthanc:
    with httpx.Client(timeout=60) as client:
        store_instances(client, orthanc.url, demo_brain_study(STUDY_UID, "SALIENCY-1", N_SLICES))
        store_instances(client, orthanc.url, demo_brain_study(OFF_STUDY_UID, "SALIENCY-2", N_SLICES))
    return orthanc


@pytest.fixture(scope="module")
def saliency_on(studies: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    with serve(_settings(studies, True)) as server, _client(server) as client:
        yield client


def _client(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=300)


@pytest.fixture(scope="module")
def reports(saliency_on: httpx.Client) -> list[dict[str, Any]]:
    """Two analyses of the study, one after the other: the second supersedes the first."""
    return [ok_json(saliency_on.post(f"/ImagingStudy/{STUDY_UID}/$analyze")) for _ in range(2)]


def _retrieve(url: str) -> Dataset:
    """One instance over WADO-RS (a multipart answer with one part)."""
    with httpx.Client(timeout=30) as http:
        response = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(f"--{boundary}".encode())[1]
    return dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")))


#: The report's key-image Media: the PNG, the Parametric Map, the Segmentation of its top region.
PNG, MAP, REGION = "saliency-png", "saliency-dicom", "saliency-region"


def _media(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's key-image Media by contained id, each resolved from `contained`."""
    contained = {f"#{r['id']}": r for r in report.get("contained", [])}
    media = [contained[m["link"]["reference"]] for m in report.get("media", [])]
    return {m["id"]: m for m in media}


def _key_image_uid() -> str:
    """The key image computed apart from the server: the slice the model gives the highest
    meningioma probability (the applicability step is off, so every slice counts)."""
    backend = OnnxRuntimeBackend(MANIFEST)
    datasets = demo_brain_study(STUDY_UID, "SALIENCY-1", N_SLICES)
    outputs = backend.infer(np.stack([to_model_input(ds, MANIFEST.input) for ds in datasets]))
    column = MANIFEST.output.labels.index("meningioma")
    return str(datasets[int(np.argmax(outputs[:, column]))].SOPInstanceUID)


def _head_mask(image: np.ndarray) -> np.ndarray:
    """The head section of an MR slice from its intensities alone: Otsu's threshold, then the
    largest 4-connected component (no scipy in the project: a breadth-first fill)."""
    values = image.astype(np.float64)
    histogram, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(histogram)
    mean = np.cumsum(histogram * centres)
    total, grand = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (grand * weight - total * mean) ** 2 / (weight * (total - weight))
    threshold = centres[int(np.nanargmax(between))]
    foreground = values > threshold
    labels = np.zeros(values.shape, dtype=np.int32)
    sizes = [0]
    for start in zip(*np.nonzero(foreground), strict=True):
        if labels[start]:
            continue
        label = len(sizes)
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                inside = 0 <= ny < values.shape[0] and 0 <= nx < values.shape[1]
                if inside and foreground[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        sizes.append(size)
    return labels == int(np.argmax(sizes))


class TestSaliencyMap:
    def test_the_result_is_positive_and_names_its_key_image(self, reports: list[dict[str, Any]]) -> None:
        report = reports[0]
        assert report["conclusionCode"][0]["coding"][0]["code"] == MENINGIOMA_SNOMED
        media = _media(report)
        assert set(media) == {PNG, MAP, REGION}
        assert [media[k]["content"]["contentType"] for k in (PNG, MAP, REGION)] == [
            "image/png",
            "application/dicom",
            "application/dicom",
        ]
        for item in media.values():
            validate(item)
        assert _key_image_uid() in report["media"][0]["comment"]

    def test_the_map_is_a_parametric_map_of_the_key_image_in_the_pacs(
        self, reports: list[dict[str, Any]], studies: EmbeddedOrthanc
    ) -> None:
        report = reports[0]
        media = _media(report)[MAP]
        pm_uid = media["identifier"][0]["value"].removeprefix("urn:oid:")
        # the PACS has it, found by QIDO-RS at instance level
        with httpx.Client(timeout=30) as http:
            found = http.get(
                f"{studies.dicomweb_url}/studies/{STUDY_UID}/instances", params={"SOPInstanceUID": pm_uid}
            ).json()
        assert len(found) == 1
        dataset = _retrieve(media["content"]["url"])
        pm = hd.pm.ParametricMap.from_dataset(dataset)
        assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE
        assert pm.SOPInstanceUID == pm_uid
        key = _key_image_uid()
        [referenced] = pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert referenced.ReferencedSOPInstanceUID == key
        [derivation] = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == key
        # in the AI result area: its own series, right after the SR of the same result
        sr = _retrieve(report["presentedForm"][0]["url"])
        assert pm.SeriesInstanceUID != sr.SeriesInstanceUID
        assert int(pm.SeriesNumber) == int(sr.SeriesNumber) + 1

    def test_the_sr_references_the_map(self, reports: list[dict[str, Any]]) -> None:
        report = reports[0]
        pm_uid = _media(report)[MAP]["identifier"][0]["value"].removeprefix("urn:oid:")
        sr = hd.sr.Comprehensive3DSR.from_dataset(_retrieve(report["presentedForm"][0]["url"]))
        items = [
            item
            for group in sr.ContentSequence
            if group.ValueType == "CONTAINER"
            for item in _walk(group)
            if item.ValueType == "IMAGE"
            and item.ConceptNameCodeSequence[0].CodeValue == SALIENCY_MAP_CONCEPT.value
        ]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items] == [pm_uid]
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert pm_uid in evidence

    def test_the_maps_maximum_lies_inside_the_head_of_the_key_image(
        self, reports: list[dict[str, Any]]
    ) -> None:
        """Rendered over its image: the map has the image's matrix and plane, and its strongest
        point falls inside the head section (Otsu + largest component of the image)."""
        media = _media(reports[0])[MAP]
        pm = hd.pm.ParametricMap.from_dataset(_retrieve(media["content"]["url"]))
        key_uid = pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        key = next(
            ds for ds in demo_brain_study(STUDY_UID, "SALIENCY-1", N_SLICES) if ds.SOPInstanceUID == key_uid
        )
        values = np.asarray(pm.pixel_array, dtype=np.float64)
        image = key.pixel_array
        assert values.shape == image.shape
        assert pm.FrameOfReferenceUID == key.FrameOfReferenceUID
        plane = pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
        np.testing.assert_allclose(
            [float(v) for v in plane.ImagePositionPatient], [float(v) for v in key.ImagePositionPatient]
        )
        measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        np.testing.assert_allclose(
            [float(v) for v in measures.PixelSpacing], [float(v) for v in key.PixelSpacing]
        )
        assert values.max() > 0, "hiding some region weakens the finding"
        mask = _head_mask(image)
        assert 0.2 < mask.mean() < 0.95, "a head section, not the whole frame"
        # Where the map is at its maximum: the centroid of the top (beyond the outermost patch
        # centres the map is flat, so argmax alone would pick the first pixel of a plateau).
        top = values >= values.max() - 0.01 * (values.max() - values.min())
        peak = tuple(round(float(c.mean())) for c in np.nonzero(top))
        assert mask[peak], f"the map's maximum at {peak} lies outside the head"

    def test_the_png_is_the_map_over_the_key_image(self, reports: list[dict[str, Any]]) -> None:
        import base64

        from PIL import Image

        png = _media(reports[0])[PNG]
        image = Image.open(io.BytesIO(base64.b64decode(png["content"]["data"])))
        key = demo_brain_study(STUDY_UID, "SALIENCY-1", N_SLICES)[0]
        assert image.size == (key.Columns, key.Rows) and image.mode == "RGB"

    def test_dciodvfy_accepts_the_map(self, reports: list[dict[str, Any]], tmp_path: Path) -> None:
        """dicom3tools' IOD checker (Debian's dicom3tools, scripts/setup.sh): no error."""
        if shutil.which("dciodvfy") is None:
            pytest.skip("dciodvfy (Debian dicom3tools) is not installed: run scripts/setup.sh test")
        dataset = _retrieve(_media(reports[0])[MAP]["content"]["url"])
        path = tmp_path / "pm.dcm"
        dataset.save_as(path, enforce_file_format=True)
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], checked.stdout + checked.stderr

    def test_a_rerun_supersedes_the_map_with_its_result(
        self, reports: list[dict[str, Any]], saliency_on: httpx.Client
    ) -> None:
        """As for the SR (ADR 0031): the new result's map is a new series after the new SR, the
        old report (and with it its key-image Media) is cancelled, the new SR names the old SR,
        which references the old map; the old map stays in the PACS."""
        first, second = reports
        old_pm = _media(first)[MAP]
        new_pm = _media(second)[MAP]
        assert old_pm["identifier"] != new_pm["identifier"]
        old = ok_json(saliency_on.get(f"/DiagnosticReport/{first['id']}"))
        assert old["status"] == "cancelled"
        assert _media(old)[MAP]["identifier"] == old_pm["identifier"]
        new_sr = _retrieve(second["presentedForm"][0]["url"])
        old_sr_uid = first["identifier"][0]["value"].removeprefix("urn:oid:")
        [predecessor] = new_sr.PredecessorDocumentsSequence
        assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            old_sr_uid
        )
        old_map = _retrieve(old_pm["content"]["url"])  # still in the PACS
        new_map = _retrieve(new_pm["content"]["url"])
        assert int(new_map.SeriesNumber) > int(old_map.SeriesNumber)
        assert int(new_map.SeriesNumber) == int(new_sr.SeriesNumber) + 1


class TestSalientRegionSegmentation:
    """The Segmentation of the map's top region (`saliency_seg`): what OHIF overlays (ADR 0044)."""

    def test_in_the_pacs_over_the_key_image_after_the_map(
        self, reports: list[dict[str, Any]], studies: EmbeddedOrthanc
    ) -> None:
        report = reports[0]
        region = _media(report)[REGION]
        validate(region)
        seg_uid = region["identifier"][0]["value"].removeprefix("urn:oid:")
        with httpx.Client(timeout=30) as http:
            found = http.get(
                f"{studies.dicomweb_url}/studies/{STUDY_UID}/instances", params={"SOPInstanceUID": seg_uid}
            ).json()
        assert len(found) == 1
        seg = hd.seg.Segmentation.from_dataset(_retrieve(region["content"]["url"]))
        assert (seg.SOPClassUID, seg.SOPInstanceUID, seg.SegmentationType) == (
            SEGMENTATION_STORAGE,
            seg_uid,
            "BINARY",
        )
        key_uid = _key_image_uid()
        key = next(
            ds for ds in demo_brain_study(STUDY_UID, "SALIENCY-1", N_SLICES) if ds.SOPInstanceUID == key_uid
        )
        [series] = seg.ReferencedSeriesSequence
        assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == key_uid
        assert series.SeriesInstanceUID == key.SeriesInstanceUID
        assert seg.FrameOfReferenceUID == key.FrameOfReferenceUID
        frame = seg.PerFrameFunctionalGroupsSequence[0]
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == key_uid
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in key.ImagePositionPatient],
        )
        shared = seg.SharedFunctionalGroupsSequence[0]
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
        np.testing.assert_allclose([float(v) for v in spacing], [float(v) for v in key.PixelSpacing])
        np.testing.assert_allclose(
            [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
            [float(v) for v in key.ImageOrientationPatient],
        )
        [segment] = seg.SegmentSequence
        assert segment.SegmentLabel == SEGMENT_LABEL
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MANIFEST.id, MANIFEST.version)
        # its own series, after the map's (SR n, map n + 1, region n + 2)
        pm = _retrieve(_media(report)[MAP]["content"]["url"])
        assert len({seg.SeriesInstanceUID, pm.SeriesInstanceUID, key.SeriesInstanceUID}) == 3
        assert int(seg.SeriesNumber) == int(pm.SeriesNumber) + 1

    def test_the_mask_is_the_stored_map_thresholded_at_half_its_maximum(
        self, reports: list[dict[str, Any]]
    ) -> None:
        media = _media(reports[0])
        seg = hd.seg.Segmentation.from_dataset(_retrieve(media[REGION]["content"]["url"]))
        values = np.asarray(
            hd.pm.ParametricMap.from_dataset(_retrieve(media[MAP]["content"]["url"])).pixel_array,
            dtype=np.float32,
        )
        mask = np.asarray(seg.pixel_array).astype(bool)
        assert mask.shape == values.shape
        np.testing.assert_array_equal(mask, values >= HALF_MAXIMUM * values.max())
        assert 0 < mask.mean() < 0.5, "a region, neither empty nor most of the image"

    def test_the_sr_references_the_region(self, reports: list[dict[str, Any]]) -> None:
        report = reports[0]
        seg_uid = _media(report)[REGION]["identifier"][0]["value"].removeprefix("urn:oid:")
        sr = hd.sr.Comprehensive3DSR.from_dataset(_retrieve(report["presentedForm"][0]["url"]))
        items = [
            item
            for group in sr.ContentSequence
            if group.ValueType == "CONTAINER"
            for item in _walk(group)
            if item.ValueType == "IMAGE"
            and item.ConceptNameCodeSequence[0].CodeValue == SALIENCY_REGION_CONCEPT.value
        ]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items] == [seg_uid]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPClassUID for i in items] == [SEGMENTATION_STORAGE]
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert seg_uid in evidence

    def test_dciodvfy_accepts_the_region(self, reports: list[dict[str, Any]], tmp_path: Path) -> None:
        if shutil.which("dciodvfy") is None:
            pytest.skip("dciodvfy (Debian dicom3tools) is not installed: run scripts/setup.sh test")
        dataset = _retrieve(_media(reports[0])[REGION]["content"]["url"])
        path = tmp_path / "seg.dcm"
        dataset.save_as(path, enforce_file_format=True)
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], checked.stdout + checked.stderr

    def test_a_rerun_supersedes_the_region_with_its_result(
        self, reports: list[dict[str, Any]], saliency_on: httpx.Client
    ) -> None:
        """As the map: a new series after the new map; the cancelled report keeps naming the old
        region, which stays in the PACS."""
        first, second = reports
        old_region, new_region = _media(first)[REGION], _media(second)[REGION]
        assert old_region["identifier"] != new_region["identifier"]
        old = ok_json(saliency_on.get(f"/DiagnosticReport/{first['id']}"))
        assert old["status"] == "cancelled"
        assert _media(old)[REGION]["identifier"] == old_region["identifier"]
        old_seg = _retrieve(old_region["content"]["url"])  # still in the PACS
        new_seg = _retrieve(new_region["content"]["url"])
        new_sr = _retrieve(second["presentedForm"][0]["url"])
        assert int(old_seg.SeriesNumber) < int(new_sr.SeriesNumber)
        assert int(new_seg.SeriesNumber) == int(new_sr.SeriesNumber) + 2


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def test_with_the_setting_off_nothing_extra_is_stored(studies: EmbeddedOrthanc) -> None:
    """The same positive study on a facade with the default (off): the SR and no map."""
    with serve(_settings(studies, False)) as server, _client(server) as client:
        report = ok_json(client.post(f"/ImagingStudy/{OFF_STUDY_UID}/$analyze"))
    assert report["conclusionCode"][0]["coding"][0]["code"] == MENINGIOMA_SNOMED
    assert "media" not in report and "contained" not in report
    with httpx.Client(timeout=30) as http:
        instances = http.get(
            f"{studies.dicomweb_url}/studies/{OFF_STUDY_UID}/instances", params={"includefield": "00080016"}
        ).json()
    classes = sorted(i["00080016"]["Value"][0] for i in instances)
    assert PARAMETRIC_MAP_STORAGE not in classes and SEGMENTATION_STORAGE not in classes
    assert len(classes) == N_SLICES + 1, "the slices and the one SR"
