"""The occlusion grid and the Parametric Map builder, without a PACS (ADR 0035).

The classifier here is a tiny deterministic function of the pixels (its evidence is one known
square), so where the map must peak is known; the real model runs in
test_saliency_operation.py."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fhir_facade.analyze.dicom_sr import SALIENCY_MAP_CONCEPT
from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.analyze.result import CodedConcept
from fhir_facade.analyze.saliency import OcclusionGrid, log_odds, occlusion_sensitivity
from fhir_facade.analyze.saliency_dicom import PARAMETRIC_MAP_STORAGE, build_saliency_map, render_overlay_png
from fhir_facade.analyze.saliency_seg import (
    HALF_MAXIMUM,
    SALIENT_REGION,
    SEGMENT_LABEL,
    SEGMENTATION_STORAGE,
    build_saliency_segmentation,
    salient_region,
)
from tests.dicom_factory import demo_brain_study

SPEC = load_manifests()["brain-tumor-vgg16"].input
MENINGIOMA = CodedConcept("http://snomed.info/sct", "302820008", "Intracranial meningioma")
#: The square the toy classifier looks at (model input pixels): rows 150-190, columns 40-80.
EVIDENCE = (slice(150, 190), slice(40, 80))


def _toy_classifier(batch: np.ndarray) -> np.ndarray:
    """Two classes; class 1's logit is the mean brightness of `EVIDENCE` (scaled), so hiding that
    square, and only it, lowers class 1."""
    logit = 8.0 * batch[:, EVIDENCE[0], EVIDENCE[1], :].mean(axis=(1, 2, 3)) - 2.0
    p = 1.0 / (1.0 + np.exp(-logit))
    return np.stack([1 - p, p], axis=1).astype(np.float32)


def _grid(patch: int = 40, stride: int = 20) -> OcclusionGrid:
    tensor = np.full((240, 240, 3), 0.8, dtype=np.float32)
    return occlusion_sensitivity(_toy_classifier, tensor, SPEC, 1, patch=patch, stride=stride, batch_size=4)


class TestOcclusion:
    def test_the_map_peaks_on_the_evidence(self) -> None:
        grid = _grid()
        full = grid.at(240, 240)
        y, x = np.unravel_index(int(full.argmax()), full.shape)
        assert 150 <= y < 190 and 40 <= x < 80, (y, x)
        assert full.max() > 0
        # far from the square, hiding the image changes nothing
        assert abs(float(full[20, 220])) < 1e-6

    def test_positions_cover_the_whole_input_and_count_the_passes(self) -> None:
        grid = _grid(patch=48, stride=40)
        # 0, 40, ..., 160 and the last one flush with the edge (192): 6 per axis
        assert grid.values.shape == (6, 6)
        assert grid.passes == 36
        assert grid.centres_x[-1] == pytest.approx(192 + 23.5)

    def test_the_drop_is_in_log_odds(self) -> None:
        grid = _grid()
        tensor = np.full((1, 240, 240, 3), 0.8, dtype=np.float32)
        base = _toy_classifier(tensor)[0, 1]
        assert grid.baseline == pytest.approx(float(base))
        hidden = tensor.copy()
        hidden[0, 140:180, 40:80, :] = 0.0  # the patch at (140, 40)
        expected = float(log_odds(np.asarray(base)) - log_odds(_toy_classifier(hidden)[:, 1])[0])
        assert float(grid.values[7, 2]) == pytest.approx(expected, rel=1e-5)

    def test_rejects_bad_parameters(self) -> None:
        with pytest.raises(ValueError, match="patch"):
            _grid(patch=0)


class TestParametricMap:
    def test_a_valid_map_over_its_source_image(self) -> None:
        source = demo_brain_study("1.2.826.0.1.3680043.8.498.727.9101", "PM-UNIT", 8)[4]
        grid = _grid()
        pm = build_saliency_map(
            source,
            grid,
            MENINGIOMA,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=9902,
            model_id="brain-tumor-vgg16",
            patch=40,
            stride=20,
        )
        buffer = io.BytesIO()
        pm.save_as(buffer)
        parsed = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
        assert parsed.SOPClassUID == PARAMETRIC_MAP_STORAGE
        assert parsed.StudyInstanceUID == source.StudyInstanceUID
        assert parsed.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert parsed.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        values = parsed.pixel_array
        assert values.shape == (source.Rows, source.Columns)
        np.testing.assert_allclose(values, grid.at(source.Rows, source.Columns))
        plane = parsed.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
        assert [float(v) for v in plane.ImagePositionPatient] == [
            float(v) for v in source.ImagePositionPatient
        ]

    def test_the_png_is_the_image_with_the_map(self) -> None:
        from PIL import Image

        source = demo_brain_study("1.2.826.0.1.3680043.8.498.727.9101", "PM-UNIT", 8)[4]
        png = render_overlay_png(source, to_model_input(source, SPEC)[..., 0], _grid())
        image = Image.open(io.BytesIO(png))
        assert image.size == (source.Columns, source.Rows) and image.mode == "RGB"
        rgb = np.asarray(image).astype(int)
        # where the map is strongest the overlay is coloured (red above green above blue)
        grid = _grid().at(source.Rows, source.Columns)
        y, x = np.unravel_index(int(grid.argmax()), grid.shape)
        assert rgb[y, x, 0] > rgb[y, x, 2] + 50

    def test_sr_concept_fits_a_dicom_code_value(self) -> None:
        assert len(SALIENCY_MAP_CONCEPT.value) <= 16


class TestSalientRegionSegmentation:
    """The map's half-maximum region as a BINARY Segmentation over the key image (ADR 0035)."""

    @staticmethod
    def _seg(grid: OcclusionGrid | None = None) -> tuple[pydicom.Dataset, hd.seg.Segmentation]:
        source = demo_brain_study("1.2.826.0.1.3680043.8.498.727.9101", "PM-UNIT", 8)[4]
        seg = build_saliency_segmentation(
            source,
            grid or _grid(),
            MENINGIOMA,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=9903,
            model_id="brain-tumor-vgg16",
            model_version="1.0.0",
        )
        assert seg is not None
        buffer = io.BytesIO()
        seg.save_as(buffer)
        return source, hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(buffer.getvalue())))

    def test_geometry_references_and_mask(self) -> None:
        source, seg = self._seg()
        assert seg.SOPClassUID == SEGMENTATION_STORAGE
        assert seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        frame = seg.PerFrameFunctionalGroupsSequence[0]
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [
            float(v) for v in source.ImagePositionPatient
        ]
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in source.PixelSpacing]
        mask = np.asarray(seg.pixel_array)
        values = _grid().at(source.Rows, source.Columns)
        expected = values >= HALF_MAXIMUM * values.max()
        assert mask.shape == (source.Rows, source.Columns)
        np.testing.assert_array_equal(mask.astype(bool), expected)
        assert 0 < expected.mean() < 0.5, "a region, not the whole image"
        # the toy classifier's evidence square (input rows 150-190, cols 40-80 of 240) is inside it
        y = int((170 + 0.5) * source.Rows / 240)
        x = int((60 + 0.5) * source.Columns / 240)
        assert mask[y, x]

    def test_one_segment_named_and_coded(self) -> None:
        _, seg = self._seg()
        [segment] = seg.SegmentSequence
        assert segment.SegmentNumber == 1 and segment.SegmentLabel == SEGMENT_LABEL
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "309825002"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == SALIENT_REGION.value
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("brain-tumor-vgg16", "1.0.0")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"

    def test_a_map_without_positive_values_has_no_region(self) -> None:
        flat = _grid()
        negative = OcclusionGrid(
            values=-np.abs(flat.values) - 1.0,
            centres_y=flat.centres_y,
            centres_x=flat.centres_x,
            input_height=flat.input_height,
            input_width=flat.input_width,
            baseline=flat.baseline,
            passes=flat.passes,
        )
        assert salient_region(negative.at(10, 10)) is None

    def test_dciodvfy_accepts_it(self, tmp_path: Path) -> None:
        if shutil.which("dciodvfy") is None:
            pytest.skip("dciodvfy (Debian dicom3tools) is not installed: run scripts/setup.sh test")
        _, seg = self._seg()
        path = tmp_path / "seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], checked.stdout + checked.stderr
