"""The pixel pipeline of `$analyze`: series selection, decoding of every compressed transfer syntax
family, the VOI/rescale arithmetic, and streaming batches from the real Orthanc.

Decoding is checked on pydicom's own test files (all in its wheel), against an uncompressed or
lossless twin where pydicom ships one. Windowing and rescale use constructed images with numbers
worked out by hand from the PS3.3 formulas, so a wrong formula fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from fhir_facade.analyze.manifest import Applicability, InputSpec, load_manifests
from fhir_facade.analyze.pixels import (
    InstanceRef,
    NoApplicableImages,
    SeriesSelection,
    UndecodableImage,
    iter_batches,
    select_for_study,
    select_series,
    to_model_input,
)
from fhir_facade.demo import COLIN27_PATH, build_demo_study
from fhir_facade.dicomweb.client import DicomJson, DicomwebClient
from fhir_facade.dicomweb.wado import InstanceNotFound, WadoClient
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from tests.conftest import PYDICOM_TEST_FILES
from tests.dicom_factory import CORPUS_ROOT, SeriesSpec, StudySpec, build_study

BRAIN = load_manifests()["brain-tumor-vgg16"]
MR_BRAIN = BRAIN.applies_to


def spec(**changes: Any) -> InputSpec:
    """An InputSpec, by default 1-channel NHWC in [0, 1] at the image's own size (no resize)."""
    values: dict[str, Any] = {"name": "x", "layout": "NHWC", "height": 1, "width": 4, "channels": 1}
    return InputSpec(**{**values, **changes})


def read(name: str) -> pydicom.FileDataset:
    return pydicom.dcmread(PYDICOM_TEST_FILES / name)


# --- decoding: one file per compressed transfer syntax family, all in pydicom's wheel -----------

FAMILY_FILES = {
    "RLE": ("MR_small_RLE.dcm", {RLELossless}),
    "JPEG baseline": ("SC_rgb_dcmtk_+eb+cr.dcm", {JPEGBaseline8Bit}),
    "JPEG extended": ("JPGExtended.dcm", {JPEGExtended12Bit}),
    "JPEG lossless": ("SC_rgb_jpeg_gdcm.dcm", {JPEGLosslessSV1}),
    "JPEG-LS": ("MR_small_jpeg_ls_lossless.dcm", {JPEGLSLossless, JPEGLSNearLossless}),
    "JPEG 2000": ("MR_small_jp2klossless.dcm", {JPEG2000Lossless, JPEG2000}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_FILES))
def test_every_compressed_family_is_covered_by_a_shipped_file(family: str) -> None:
    name, syntaxes = FAMILY_FILES[family]
    ds = read(name)
    assert ds.file_meta.TransferSyntaxUID in syntaxes
    tensor = to_model_input(ds, BRAIN.input)
    assert tensor.shape == (240, 240, 3) and tensor.dtype == np.float32
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0 and tensor.std() > 0.05


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_lossless_grayscale_gives_the_same_tensor_as_the_uncompressed_twin(name: str) -> None:
    expected = to_model_input(read("MR_small.dcm"), BRAIN.input)
    assert np.array_equal(to_model_input(read(name), BRAIN.input), expected)


def test_jpeg_lossless_rgb_keeps_colour_exactly() -> None:
    """JPEG lossless and RLE copies of one RGB image; at its own size the tensor is pixels / 255."""
    rgb = spec(height=100, width=100, channels=3)
    expected = read("SC_rgb_rle.dcm").pixel_array.astype(np.float32) / 255
    assert np.array_equal(to_model_input(read("SC_rgb_jpeg_gdcm.dcm"), rgb), expected)
    assert np.array_equal(to_model_input(read("SC_rgb_rle.dcm"), rgb), expected)


@pytest.mark.parametrize(
    ("name", "max_error"),
    [("SC_rgb_dcmtk_+eb+cr.dcm", 1 / 255), ("SC_rgb_jpeg_dcmtk.dcm", 6 / 255)],  # RGB and YBR_FULL JPEG
)
def test_jpeg_baseline_is_close_to_the_lossless_original(name: str, max_error: float) -> None:
    rgb = spec(height=100, width=100, channels=3)
    error = np.abs(to_model_input(read(name), rgb) - to_model_input(read("SC_rgb_rle.dcm"), rgb))
    assert error.max() <= max_error + 1e-6
    assert error.mean() < 0.01


def test_colour_to_one_channel_is_luminance() -> None:
    one = spec(height=100, width=100, channels=1)
    rgb = read("SC_rgb_rle.dcm").pixel_array.astype(np.float64) / 255
    luma = rgb @ [0.299, 0.587, 0.114]
    assert np.allclose(to_model_input(read("SC_rgb_rle.dcm"), one)[..., 0], luma, atol=1e-6)


def test_jpeg_extended_agrees_with_jpeg_2000_of_the_same_scan() -> None:
    """No uncompressed twin ships; NEMA's NM1 as JPEG extended (libjpeg) and JPEG 2000 (OpenJPEG)
    is the same scan decoded by two independent codecs."""
    minmax = BRAIN.input.model_copy(update={"windowing": "minmax"})
    jpeg = to_model_input(read("JPGExtended.dcm"), minmax)[..., 0]
    j2k = to_model_input(read("JPEG2000.dcm"), minmax)[..., 0]
    assert np.corrcoef(jpeg.ravel(), j2k.ravel())[0, 1] > 0.9


def test_multiframe_uses_the_first_frame() -> None:
    ds = read("examples_ybr_color.dcm")  # JPEG baseline, YBR_FULL_422, 30 frames
    assert ds.NumberOfFrames == 30
    tensor = to_model_input(ds, spec(height=240, width=320, channels=3))
    assert np.array_equal(tensor, ds.pixel_array[0].astype(np.float32) / 255)
    assert not np.array_equal(tensor, ds.pixel_array[1].astype(np.float32) / 255)


def test_undecodable_jpeg_names_its_transfer_syntax() -> None:
    # NEMA's NM1_JPLY: libjpeg refuses its SOS parameters and Pillow has no 12-bit JPEG.
    with pytest.raises(UndecodableImage, match=r"JPEG Extended \(Process 2 and 4\)") as raised:
        to_model_input(read("JPEG-lossy.dcm"), BRAIN.input)
    assert raised.value.transfer_syntax == JPEGExtended12Bit


def test_no_pixel_data_is_undecodable() -> None:
    with pytest.raises(UndecodableImage, match=r"no \(7FE0,0010\) Pixel Data"):
        to_model_input(read("test-SR.dcm"), BRAIN.input)


# --- the arithmetic, on constructed images ---------------------------------------------------------


def image(pixels: list[list[int]], **attributes: Any) -> Dataset:
    """A signed 16-bit MONOCHROME2 image in Explicit VR Little Endian with `attributes` set."""
    array = np.asarray(pixels, dtype="<i2")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = array.tobytes()
    return ds


def values(ds: Dataset, **changes: Any) -> list[float]:
    return [round(float(v), 6) for v in to_model_input(ds, spec(**changes)).ravel()]


def test_linear_window_follows_ps3_3_c_11_2_1_2() -> None:
    # c = 100, w = 201: y = (x - 99.5) / 200 + 0.5, 0 at or below -0.5, 1 above 199.5.
    ds = image([[-1, 0, 100, 200]], WindowCenter=100, WindowWidth=201)
    assert values(ds) == [0.0, 0.0025, 0.5025, 1.0]


def test_first_of_several_windows_is_used() -> None:
    ds = image([[-1, 0, 100, 200]], WindowCenter=[100, 3000], WindowWidth=[201, 10])
    assert values(ds) == [0.0, 0.0025, 0.5025, 1.0]


def test_rescale_comes_before_the_window() -> None:
    # HU = 2 * stored - 1024 = [0, 20, 40, -1024]; c = 20, w = 41: y = (HU - 19.5) / 40 + 0.5.
    ds = image([[512, 522, 532, 0]], RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=20, WindowWidth=41)
    assert values(ds) == [0.0125, 0.5125, 1.0, 0.0]


def test_width_one_is_a_threshold_at_center_minus_half() -> None:
    ds = image([[9, 10, 11, 12]], WindowCenter=10, WindowWidth=1)
    assert values(ds) == [0.0, 1.0, 1.0, 1.0]


def test_linear_exact_and_sigmoid_functions() -> None:
    exact = image([[-100, 0, 50, 200]], WindowCenter=0, WindowWidth=200, VOILUTFunction="LINEAR_EXACT")
    assert values(exact) == [0.0, 0.5, 0.75, 1.0]  # (x - c) / w + 0.5 (C.11.2.1.3.2)
    sigmoid = image([[0, 50, -50, 500]], WindowCenter=0, WindowWidth=200, VOILUTFunction="SIGMOID")
    # 1 / (1 + exp(-4 (x - c) / w)) (C.11.2.1.3.1)
    assert values(sigmoid) == [0.5, round(1 / (1 + np.exp(-1)), 6), round(1 / (1 + np.exp(1)), 6), 0.999955]


def voi_lut(first_mapped: int, entries: list[int], bits: int = 16) -> Dataset:
    """One VOI LUT Sequence item (PS3.3 C.11.2.1.1): LUT Descriptor = entries, first value mapped, bits."""
    item = Dataset()
    # US, or SS when the first value mapped is negative (the VR is "US or SS", PS3.6).
    item.add_new("LUTDescriptor", "SS" if first_mapped < 0 else "US", [len(entries), first_mapped, bits])
    item.add_new("LUTData", "US", entries)
    return item


def test_a_voi_lut_sequence_is_applied_and_preferred_to_the_window() -> None:
    """Inputs below the first value mapped take the first entry, above the last take the last; the
    output is scaled by the LUT's own span (here 0..1000, though the entries are declared 16-bit).
    The window beside it (which the code once used instead) is not applied."""
    lut = voi_lut(0, [0, 100, 400, 1000])
    ds = image([[-1, 0, 1, 2, 3, 5]], VOILUTSequence=[lut], WindowCenter=100, WindowWidth=201)
    assert values(ds, width=6) == [0.0, 0.0, 0.1, 0.4, 1.0, 1.0]


def test_a_voi_lut_follows_the_rescale_and_may_start_below_zero() -> None:
    # HU = stored - 1024 = [-1026, -1025, -1024, -1023]; the LUT maps -1025.. to 10, 20, 50 of 8 bits.
    lut = voi_lut(-1025, [10, 20, 50], bits=8)
    ds = image([[-2, -1, 0, 1]], RescaleSlope=1, RescaleIntercept=-1024, VOILUTSequence=[lut])
    assert values(ds) == [0.0, 0.0, 0.25, 1.0]


def test_without_a_usable_window_the_percentiles_are_used() -> None:
    # 0..200: the 0.5th percentile is 1.0 and the 99.5th is 199.0, so y = (x - 1) / 198.
    pixels = np.arange(201).reshape(3, 67).tolist()
    for ds in (image(pixels), image(pixels, WindowCenter=100, WindowWidth=0)):  # none; width 0
        got = values(ds, height=3, width=67)
        assert [got[0], got[1], got[2], got[100], got[199], got[200]] == [0.0, 0.0, 0.005051, 0.5, 1.0, 1.0]
    minmax = image(pixels, WindowCenter=0, WindowWidth=2)  # "minmax" ignores the image's window
    assert values(minmax, height=3, width=67, windowing="minmax")[100] == 0.5


def test_constant_image_without_window_is_blank_not_nan() -> None:
    assert values(image([[7, 7, 7, 7]])) == [0.0, 0.0, 0.0, 0.0]


def test_monochrome1_is_inverted_after_the_window() -> None:
    ds = image(
        [[-1, 0, 100, 200]], WindowCenter=100, WindowWidth=201, PhotometricInterpretation="MONOCHROME1"
    )
    assert values(ds) == [1.0, 0.9975, 0.4975, 0.0]


def test_scale_mean_std_channels_and_nchw() -> None:
    ds = image([[-1, 0, 100, 200]], WindowCenter=100, WindowWidth=201)
    tensor = to_model_input(
        ds, spec(layout="NCHW", channels=3, scale=(-1.0, 1.0), mean=(0.5, 0.0, -0.5), std=(0.25, 0.5, 1.0))
    )
    assert tensor.shape == (3, 1, 4) and tensor.dtype == np.float32
    y = np.array([0.0, 0.0025, 0.5025, 1.0]) * 2 - 1  # onto the scale (-1, 1)
    assert np.allclose(tensor[0, 0], (y - 0.5) / 0.25)
    assert np.allclose(tensor[1, 0], y / 0.5)
    assert np.allclose(tensor[2, 0], y + 0.5)


def test_mean_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match=r"spec\.mean has 2 values, expected 1 or 3"):
        to_model_input(image([[0, 1, 2, 3]]), spec(channels=3, mean=(0.1, 0.2)))


def test_resize_keeps_float_precision_and_orientation() -> None:
    # (1000 - 2999) / 10000 + 0.5 = 0.3001 everywhere; through 8 bits it would be 77/255 = 0.30196.
    flat = image([[1000] * 8] * 8, WindowCenter=2999, WindowWidth=10000, VOILUTFunction="LINEAR_EXACT")
    resized = to_model_input(flat, spec(height=20, width=10))
    assert resized.shape == (20, 10, 1)
    assert np.allclose(resized, 0.3001, atol=1e-6)
    # Top half bright, bottom half dark, 16 x 8: the output of height 20 and width 10 keeps it so.
    halves = image([[100] * 8] * 8 + [[0] * 8] * 8, WindowCenter=50, WindowWidth=101)
    out = to_model_input(halves, spec(height=20, width=10))[..., 0]
    assert out[:8].min() > 0.99 and out[-8:].max() < 0.01
    assert np.all(np.diff(out[:, 5]) <= 1e-6)  # rows only ever get darker going down


# --- series selection, on DICOM JSON --------------------------------------------------------------


def series_json(uid: str, modality: str, body_part: str | None = None, number: int = 1) -> DicomJson:
    item: DicomJson = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0020000E": {"vr": "UI", "Value": [uid]},
        "00080060": {"vr": "CS", "Value": [modality]},
        "00200011": {"vr": "IS", "Value": [number]},
    }
    if body_part is not None:
        item["00180015"] = {"vr": "CS", "Value": [body_part]}
    return item


def instance_json(
    uid: str, number: int | None, rows: int | None = 256, sop_class: str = "1.2.840.10008.5.1.4.1.1.4"
) -> DicomJson:
    item: DicomJson = {
        "00080016": {"vr": "UI", "Value": [sop_class]},
        "00080018": {"vr": "UI", "Value": [uid]},
    }
    if number is not None:
        item["00200013"] = {"vr": "IS", "Value": [number]}
    if rows is not None:
        item["00280010"] = {"vr": "US", "Value": [rows]}
    return item


def test_selects_applicable_images_in_instance_number_order() -> None:
    series = [
        series_json("9", "CT", "HEAD", number=1),
        series_json("8", "MR", "KNEE", number=2),
        series_json("7", "MR", "brain", number=4),
        series_json("6", "MR", None, number=3),  # no body part: accepted ("" is listed)
    ]
    instances = {
        "7": [
            instance_json("7.10", 10),
            instance_json("7.sr", None, rows=None, sop_class="1.2.840.10008.5.1.4.1.1.88.22"),
            instance_json("7.2", 2),
            instance_json("7.none", None),
            instance_json("7.1", 1),
        ],
        "6": [instance_json("6.1", 1)],
    }
    chosen = select_series(series, instances, MR_BRAIN)
    assert [s.series_uid for s in chosen] == ["6", "7"]  # by SeriesNumber
    assert chosen[1] == SeriesSelection(
        "1.2.3",
        "7",
        "MR",
        "brain",
        (
            InstanceRef("7.1", "1.2.840.10008.5.1.4.1.1.4", 1),
            InstanceRef("7.2", "1.2.840.10008.5.1.4.1.1.4", 2),
            InstanceRef("7.10", "1.2.840.10008.5.1.4.1.1.4", 10),
            InstanceRef("7.none", "1.2.840.10008.5.1.4.1.1.4", None),
        ),
    )
    only = select_series(series, instances, MR_BRAIN, series_uid="6")
    assert [s.series_uid for s in only] == ["6"]


WANTS = "the model applies to MR of BRAIN, HEAD, HEADNECK or unspecified body part"


@pytest.mark.parametrize(
    ("series", "instances", "series_uid", "reason"),
    [
        (
            [series_json("1", "CT", "HEAD"), series_json("2", "SR")],
            {},
            None,
            f"study 1.2.3 has no MR series (it has CT, SR); {WANTS}",
        ),
        ([series_json("1", "MR", "KNEE")], {}, None, f"study 1.2.3 has MR series only of KNEE; {WANTS}"),
        ([series_json("1", "MR", "HEAD")], {}, "5", "study 1.2.3 has no series 5"),
        (
            [series_json("1", "MR", "HEAD"), series_json("2", "CT", "HEAD")],
            {},
            "2",
            f"series 2 of study 1.2.3 has no MR series (it has CT); {WANTS}",
        ),
        (
            [series_json("1", "MR", "HEAD")],
            {"1": [instance_json("1.1", 1, rows=None, sop_class="1.2.840.10008.5.1.4.1.1.11.1")]},
            None,
            f"in study 1.2.3, series 1 has 0 image instance(s) (at least 1 needed); {WANTS}",
        ),
        ([], {}, None, f"the study has no series; {WANTS}"),
    ],
)
def test_nothing_applicable_says_what_is_there(
    series: list[DicomJson], instances: dict[str, list[DicomJson]], series_uid: str | None, reason: str
) -> None:
    with pytest.raises(NoApplicableImages) as raised:
        select_series(series, instances, MR_BRAIN, series_uid=series_uid)
    assert raised.value.reason == reason == str(raised.value)


def test_min_instances_and_any_body_part() -> None:
    volume = Applicability(modalities=frozenset({"CT"}), min_instances=3)
    series = [series_json("1", "CT", "CHEST")]
    two = {"1": [instance_json("1.1", 1), instance_json("1.2", 2)]}
    with pytest.raises(
        NoApplicableImages,
        match=r"series 1 has 2 image instance\(s\) \(at least 3 needed\); "
        "the model applies to CT of any body part",
    ):
        select_series(series, two, volume)
    three = {"1": [*two["1"], instance_json("1.3", 3)]}
    assert len(select_series(series, three, volume)[0].instances) == 3


# --- against the real Orthanc ---------------------------------------------------------------------


@pytest.fixture
async def qido(orthanc: EmbeddedOrthanc) -> AsyncIterator[DicomwebClient]:
    client = DicomwebClient(orthanc.dicomweb_url, timeout=30, max_connections=4)
    await client.open()
    yield client
    await client.close()


@pytest.fixture
async def wado(orthanc: EmbeddedOrthanc) -> AsyncIterator[WadoClient]:
    async with WadoClient(orthanc.dicomweb_url, timeout=30, max_connections=4) as client:
        yield client


def uid(*names: str) -> UID:
    """A fixed UID per name: pydicom's test files share UIDs, and Orthanc keeps the first stored."""
    return generate_uid(CORPUS_ROOT, entropy_srcs=["test_pixels", *names])


def _store(orthanc: EmbeddedOrthanc, datasets: list[pydicom.FileDataset]) -> None:
    with httpx.Client(timeout=30) as client:
        store_instances(client, orthanc.url, datasets)


async def test_ct_only_study_is_not_applicable(orthanc: EmbeddedOrthanc, qido: DicomwebClient) -> None:
    study = StudySpec(
        patient_id="PX-CT",
        patient_name="Pixel^Ct",
        study_uid=uid("ct-only", "study"),
        series=[
            SeriesSpec("CT", "AX HEAD", 1, body_part="HEAD"),
            SeriesSpec("CT", "COR", 2, body_part="HEAD"),
        ],
    )
    _store(orthanc, build_study(study))
    before = qido.request_count
    with pytest.raises(NoApplicableImages) as raised:
        await select_for_study(qido, study.study_uid, MR_BRAIN)
    assert raised.value.reason == f"study {study.study_uid} has no MR series (it has CT); {WANTS}"
    assert qido.request_count - before == 1  # no instance query for series the model does not take


async def test_sr_only_study_is_not_applicable(orthanc: EmbeddedOrthanc, qido: DicomwebClient) -> None:
    sr = read("test-SR.dcm")
    sr.StudyInstanceUID, sr.SOPInstanceUID = uid("sr-only", "study"), uid("sr-only", "sop")
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    _store(orthanc, [sr])
    with pytest.raises(NoApplicableImages, match=r"has no MR series \(it has SR\)"):
        await select_for_study(qido, sr.StudyInstanceUID, MR_BRAIN)


async def test_unknown_study_is_not_applicable(qido: DicomwebClient) -> None:
    with pytest.raises(NoApplicableImages, match=r"study 1\.2\.3\.999 has no series in the PACS"):
        await select_for_study(qido, "1.2.3.999", MR_BRAIN)


async def test_compressed_series_streams_like_its_uncompressed_twin(
    orthanc: EmbeddedOrthanc, qido: DicomwebClient, wado: WadoClient
) -> None:
    """MR_small as RLE, JPEG 2000 and JPEG-LS (lossless) in one MR series, through QIDO and WADO."""
    study_uid, series_uid = (uid("compressed", level) for level in ("study", "series"))
    names = ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
    datasets = []
    for number, name in zip((3, 1, 2), names, strict=True):
        ds = read(name)
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "PX-MR", study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("compressed", str(number))
        ds.InstanceNumber, ds.BodyPartExamined = number, "HEAD"
        datasets.append(ds)
    _store(orthanc, datasets)

    (selection,) = await select_for_study(qido, study_uid, MR_BRAIN)
    assert [ref.instance_number for ref in selection.instances] == [1, 2, 3]
    expected = to_model_input(read("MR_small.dcm"), BRAIN.input)
    batches = [(refs, batch) async for refs, batch in iter_batches(wado, selection, BRAIN.input, 2)]
    assert [len(refs) for refs, _ in batches] == [2, 1]
    assert sorted(ref.instance_number for refs, _ in batches for ref in refs) == [1, 2, 3]
    for _, batch in batches:
        for tensor in batch:
            assert np.array_equal(tensor, expected)


@pytest.mark.skipif(not COLIN27_PATH.exists(), reason=f"{COLIN27_PATH} missing: apt-get install mricron-data")
async def test_demo_brain_study_becomes_model_batches(
    orthanc: EmbeddedOrthanc, qido: DicomwebClient, wado: WadoClient
) -> None:
    # The demo's UIDs are fixed and another test may have stored it with another slice count, so
    # this copy of the same brain slices gets UIDs of its own.
    n_slices = 6
    study_uid = uid("demo", "study")
    datasets = build_demo_study(n_slices)
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, uid("demo", "series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("demo", str(ds.InstanceNumber))
    _store(orthanc, datasets)

    (selection,) = await select_for_study(qido, study_uid, MR_BRAIN)
    assert (selection.modality, selection.body_part, len(selection.instances)) == ("MR", "BRAIN", n_slices)
    before = wado.request_count
    shapes, numbers, slices = [], [], []
    async for refs, batch in iter_batches(wado, selection, BRAIN.input, BRAIN.batch_size):
        shapes.append(batch.shape)
        numbers += [ref.instance_number for ref in refs]
        slices += list(batch)
    assert shapes == [(4, 240, 240, 3), (2, 240, 240, 3)]
    assert sorted(numbers) == list(range(1, n_slices + 1))
    assert wado.request_count - before == 1, "one streamed series request, not one per slice"
    for tensor in slices:
        assert tensor.dtype == np.float32 and tensor.min() >= 0.0 and tensor.max() <= 1.0
        assert tensor.std() > 0.05  # a brain, not a blank slice
        assert np.array_equal(tensor[..., 0], tensor[..., 2])  # grayscale repeated to 3 channels


async def test_batch_size_must_be_positive(wado: WadoClient) -> None:
    selection = SeriesSelection("1.2", "1.3", "MR", None, ())
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        async for _ in iter_batches(wado, selection, BRAIN.input, 0):
            pass


async def test_instances_the_series_answer_lacks_are_fetched_one_by_one(
    orthanc: EmbeddedOrthanc, qido: DicomwebClient, wado: WadoClient
) -> None:
    """A selection naming an instance the series stream does not deliver (here: deleted from the
    PACS after selection) is retried on its own, which then reports it missing."""
    study_uid, series_uid = uid("gone", "study"), uid("gone", "series")
    datasets = []
    for number in (1, 2):
        ds = read("MR_small.dcm")
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "PX-GONE", study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("gone", str(number))
        ds.InstanceNumber, ds.BodyPartExamined = number, "HEAD"
        datasets.append(ds)
    _store(orthanc, datasets)
    (selection,) = await select_for_study(qido, study_uid, MR_BRAIN)
    with httpx.Client(timeout=30) as client:
        found = client.post(f"{orthanc.url}/tools/lookup", content=uid("gone", "2")).json()
        client.delete(f"{orthanc.url}{found[0]['Path']}").raise_for_status()
    with pytest.raises(InstanceNotFound):
        async for _ in iter_batches(wado, selection, BRAIN.input, 4):
            pass
