"""The demo study is a real brain MRI that survives Part 10 and carries consistent geometry."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from fhir_facade.demo import (
    COLIN27_PATH,
    DEMO_SERIES_UID,
    DEMO_STUDY_UID,
    build_demo_study,
    load_colin27,
    png_preview,
)

pytestmark = pytest.mark.skipif(
    not COLIN27_PATH.parent.exists(),
    reason=f"{COLIN27_PATH} missing: apt-get install mricron-data (ships the Colin27 template)",
)


@pytest.fixture(scope="module")
def study() -> list[pydicom.FileDataset]:
    return build_demo_study()


def _roundtrip(ds: pydicom.FileDataset) -> pydicom.FileDataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_colin27_header_is_read() -> None:
    volume = load_colin27()
    assert volume.data.shape == (181, 217, 181)
    assert volume.data.dtype == np.uint8
    assert volume.voxel_size == (1.0, 1.0, 1.0)
    # MNI origin (near the anterior commissure) is voxel (90, 125, 71) in Colin27.
    assert np.allclose(volume.affine @ [90, 125, 71, 1], [0, 0, 0, 1])


def test_slice_count_and_uids(study: list[pydicom.FileDataset]) -> None:
    assert len(study) == 24
    assert len(build_demo_study(n_slices=5)) == 5
    assert {ds.StudyInstanceUID for ds in study} == {DEMO_STUDY_UID}
    assert {ds.SeriesInstanceUID for ds in study} == {DEMO_SERIES_UID}
    assert len({ds.SOPInstanceUID for ds in study}) == 24
    assert [ds.SOPInstanceUID for ds in build_demo_study()] == [ds.SOPInstanceUID for ds in study]
    with pytest.raises(ValueError, match="n_slices"):
        build_demo_study(n_slices=0)


def test_required_attributes(study: list[pydicom.FileDataset]) -> None:
    for number, original in enumerate(study, start=1):
        ds = _roundtrip(original)
        assert ds.SOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.Modality == "MR"
        assert ds.BodyPartExamined == "BRAIN"
        assert ds.PatientID == "DEMO-0001"
        assert str(ds.PatientName) == "Demo^Colin"
        assert ds.AccessionNumber == "DEMO-ACC-1"
        assert ds.StudyDescription == "MRI BRAIN demo (Colin27)"
        assert ds.StudyDate and ds.StudyTime
        assert ds.TimezoneOffsetFromUTC == "+0000"
        assert str(ds.ReferringPhysicianName)
        assert ds.InstanceNumber == number
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.SamplesPerPixel, ds.PixelRepresentation) == (16, 1, 0)
        assert (ds.Rows, ds.Columns) == (217, 181)


def test_geometry_is_consistent(study: list[pydicom.FileDataset]) -> None:
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in study])
    assert [float(v) for v in study[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    # Slices stack along +z (feet -> head) at the declared spacing; x and y do not move.
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps[:, :2], 0)
    assert np.allclose(steps[:, 2], float(study[0].SpacingBetweenSlices))
    assert float(study[0].SliceThickness) == 1.0
    assert [float(v) for v in study[0].PixelSpacing] == [1.0, 1.0]
    # First pixel is patient right-anterior (LPS -x, -y) for a radiological axial view.
    assert positions[0, 0] < 0 and positions[0, 1] < 0
    for ds in study:
        assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])


def test_pixels_hold_a_brain(study: list[pydicom.FileDataset]) -> None:
    middle = _roundtrip(study[len(study) // 2]).pixel_array
    assert middle.dtype == np.uint16
    assert middle.max() > 1000
    assert (middle > 500).mean() > 0.3  # a head fills much of the field of view
    for ds in study:
        assert 500 < int(ds.pixel_array.max()) < 4096, f"slice {ds.InstanceNumber}"


def test_png_preview_is_a_png(study: list[pydicom.FileDataset]) -> None:
    png = png_preview(study[12])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"IHDR" in png[:20] and png.endswith(b"IEND\xaeB`\x82")
