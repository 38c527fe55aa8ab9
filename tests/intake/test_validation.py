"""The checks an instance passes before it may reach the PACS (fhir_facade/intake/validation.py)."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest

from fhir_facade.intake.validation import check_instance, dciodvfy_available, run_dciodvfy
from tests import dicom_factory
from tests.intake.conftest import valid_ct_study


def _write(tmp_path: Path, ds: object) -> Path:
    path = tmp_path / "instance.dcm"
    path.write_bytes(dicom_factory.to_bytes(ds))  # type: ignore[arg-type]
    return path


def test_a_complete_ct_instance_passes(tmp_path: Path) -> None:
    verdict = check_instance(_write(tmp_path, valid_ct_study("V-1", n_instances=1)[0]))
    assert verdict.ok, verdict.errors


def test_missing_type1_attributes_of_the_iod_are_refused(tmp_path: Path) -> None:
    ds = valid_ct_study("V-2", n_instances=1)[0]
    del ds.RescaleSlope
    del ds.FrameOfReferenceUID
    errors = check_instance(_write(tmp_path, ds)).errors
    assert "Type 1 attribute RescaleSlope of module ct-image is missing" in errors
    assert "Type 1 attribute FrameOfReferenceUID of module frame-of-reference is missing" in errors


def test_bad_uids_and_pixel_data_are_refused(tmp_path: Path) -> None:
    ds = valid_ct_study("V-3", n_instances=1)[0]
    ds.SeriesInstanceUID = "1.2.03.4"  # a leading zero in a component (PS3.5 9.1)
    ds.HighBit = 3
    ds.PixelData = ds.PixelData + b"\0\0\0\0"
    errors = check_instance(_write(tmp_path, ds)).errors
    assert any(e.startswith("SeriesInstanceUID '1.2.03.4' is not a valid UID") for e in errors), errors
    assert any(e.startswith("High Bit 3") for e in errors), errors
    assert any(e.startswith("Pixel Data holds") for e in errors), errors


def test_a_truncated_file_is_refused_though_its_pixel_data_is_not_read(tmp_path: Path) -> None:
    """Pixel data is skipped, not read: a file cut short inside it is refused by its length, from
    bytes in memory and from a file alike (the same verdict either way)."""
    whole = dicom_factory.to_bytes(valid_ct_study("V-5", n_instances=1)[0])
    assert check_instance(whole).ok
    cut = whole[:-100]
    (tmp_path / "cut.dcm").write_bytes(cut)
    for verdict in (check_instance(cut), check_instance(tmp_path / "cut.dcm")):
        assert not verdict.ok
        assert any("after the end of the file" in e for e in verdict.errors), verdict.errors
        assert verdict.sop_instance_uid  # the UIDs before it were read: the report names the instance


def test_garbage_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    verdict = check_instance(path)
    assert not verdict.ok
    assert all(verdict.errors), verdict.errors


@pytest.mark.skipif(not dciodvfy_available(), reason="dicom3tools is not installed (scripts/setup.sh)")
def test_dciodvfy_refuses_type1_errors_and_warns_on_the_rest(tmp_path: Path) -> None:
    ds = valid_ct_study("V-4", n_instances=1)[0]
    del ds.RescaleIntercept
    path = _write(tmp_path, ds)
    verdict = check_instance(path)
    run_dciodvfy(path, verdict)
    assert any(
        "dciodvfy: Missing attribute Type 1 Required Element=<RescaleIntercept>" in e for e in verdict.errors
    )
    assert any(w.startswith("dciodvfy: ") and "Type 2" in w for w in verdict.warnings)
    rtplan = Path(pydicom.data.get_testdata_file("rtplan.dcm"))  # type: ignore[arg-type]
    other = check_instance(rtplan)
    run_dciodvfy(rtplan, other)
    assert other.ok
    assert "dciodvfy: MediaStorageSOPInstanceUID different from SOPInstanceUID" in other.warnings
