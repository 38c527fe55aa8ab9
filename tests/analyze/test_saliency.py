"""The occlusion grid and the Parametric Map builder, without a PACS (ADR 0035).

The classifier here is a tiny deterministic function of the pixels (its evidence is one known
square), so where the map must peak is known; the real model runs in
test_saliency_operation.py."""

from __future__ import annotations

import io

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
