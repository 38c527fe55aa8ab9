"""From a study in the PACS to model input tensors: choose the series, fetch, decode, preprocess.

Three steps, each testable on its own:

- `select_series` (pure, on QIDO-RS DICOM JSON) picks the series a model applies to and lists their
  image instances in InstanceNumber order; `select_for_study` runs the two QIDO queries it needs.
- `to_model_input` turns one dataset into one input tensor, following the manifest's `InputSpec`.
- `iter_batches` streams a selected series over WADO-RS and yields batches ready for the model,
  decoding in a worker thread so the server keeps answering while a study is analysed.

Image rules, decided once here (DICOM PS3.3 C.7.6.3 and C.11):

- Only the first frame of a multi-frame instance is used: one input per instance.
- Grayscale: Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence), then the VOI step
  to [0, 1], both by pydicom (`apply_modality_lut`, `apply_voi_lut`): "dicom" uses the first VOI
  LUT Sequence item, else the first WindowCenter/WindowWidth with the VOILUTFunction (LINEAR by
  default, PS3.3 C.11.2.1.2.1; LINEAR_EXACT and SIGMOID, C.11.2.1.3); without a usable VOI
  (absent, or a width below 1) it falls back to the 0.5/99.5 percentiles, which "minmax" always
  uses. MONOCHROME1 is inverted after the VOI step, as a display would show it (lowest values
  white).
- Colour (RGB, the YBR family, which pydicom converts to RGB while decoding, and PALETTE COLOR):
  there is no VOI step for colour in DICOM, so samples are divided by their full range
  (2**BitsStored - 1). With `channels` 3 the RGB planes are kept as they are, since a colour model
  was trained on colour; with `channels` 1 they become luminance Y = 0.299 R + 0.587 G + 0.114 B
  (the YBR_FULL definition of PS3.3 C.7.6.3.1.2). Grayscale with `channels` 3 is repeated.
- Resizing stretches to height x width (no letterbox, as the default model was trained), with
  PIL's bilinear filter on float32 planes, so no precision is lost to 8 bits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from fhir_facade.analyze.manifest import Applicability, InputSpec
from fhir_facade.dicom_to_fhir.attributes import integer, string
from fhir_facade.dicomweb.client import DicomJson, DicomwebClient
from fhir_facade.dicomweb.wado import WadoClient

__all__ = [
    "InstanceRef",
    "NoApplicableImages",
    "SeriesSelection",
    "UndecodableImage",
    "iter_batches",
    "select_for_study",
    "select_series",
    "to_model_input",
]

# DICOM JSON tags (PS3.18 F.2): Modality, SeriesNumber and the UIDs are default QIDO return keys;
# Rows is a default instance-level key too (PS3.18 table 10.6.3-5) but asked for explicitly.
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_MODALITY = "00080060"
_BODY_PART = "00180015"
_SERIES_NUMBER = "00200011"
_SOP_CLASS = "00080016"
_SOP_INSTANCE = "00080018"
_INSTANCE_NUMBER = "00200013"
_ROWS = "00280010"
_SERIES_FIELDS = (_BODY_PART,)
_INSTANCE_FIELDS = (_INSTANCE_NUMBER, _SOP_CLASS, _ROWS)

# ITU-R BT.601 luma weights, as in the YBR_FULL definition (PS3.3 C.7.6.3.1.2).
_LUMA = np.array([0.299, 0.587, 0.114])


class NoApplicableImages(Exception):
    """The study holds nothing the model applies to; `reason` says what it holds instead."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UndecodableImage(Exception):
    """The pixel data cannot be turned into an image (codec failure, unsupported layout)."""

    def __init__(self, message: str, transfer_syntax: str | None = None) -> None:
        super().__init__(message)
        self.transfer_syntax = transfer_syntax


@dataclass(frozen=True)
class InstanceRef:
    """One image instance of a selected series, as QIDO-RS listed it."""

    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None


@dataclass(frozen=True)
class SeriesSelection:
    """A series the model applies to, with its image instances sorted by InstanceNumber."""

    study_uid: str
    series_uid: str
    modality: str
    body_part: str | None
    instances: tuple[InstanceRef, ...]


def _describe(applies: Applicability) -> str:
    modalities = "/".join(sorted(applies.modalities))
    if not applies.body_parts:
        return f"the model applies to {modalities} of any body part"
    named = ", ".join(sorted(part for part in applies.body_parts if part))
    if "" in applies.body_parts:
        named = f"{named} or unspecified body part" if named else "unspecified body part"
    return f"the model applies to {modalities} of {named}"


def _is_image(instance: DicomJson) -> bool:
    # Rows > 0 is what makes an instance an image: SR, KO, presentation states and other
    # non-image objects have no Image Pixel module, whatever their series' modality says.
    return (integer(instance, _ROWS) or 0) > 0


def _instance_order(ref: InstanceRef) -> tuple[bool, int, str]:
    return (ref.instance_number is None, ref.instance_number or 0, ref.sop_instance_uid)


def select_series(
    series_json: list[DicomJson],
    instances_json_by_series: Mapping[str, list[DicomJson]],
    applies: Applicability,
    *,
    series_uid: str | None = None,
) -> list[SeriesSelection]:
    """The series of one study that `applies` accepts, each with at least `min_instances` images.

    `series_json` is the study's QIDO-RS series answer; `instances_json_by_series` the instance
    answers of (at least) the accepted series, by SeriesInstanceUID. `series_uid` restricts the
    choice to that one series. Raises `NoApplicableImages` naming what the study has instead.
    """
    study_uid = next((uid for uid in (string(s, _STUDY_UID) for s in series_json) if uid), None)
    scope = f"study {study_uid}" if study_uid else "the study"
    wants = _describe(applies)
    if series_uid is not None:
        series_json = [s for s in series_json if string(s, _SERIES_UID) == series_uid]
        if not series_json:
            raise NoApplicableImages(f"{scope} has no series {series_uid}")
        scope = f"series {series_uid} of {scope}"
    if not series_json:
        raise NoApplicableImages(f"{scope} has no series; {wants}")

    modalities = "/".join(sorted(applies.modalities))
    of_modality = [s for s in series_json if (string(s, _MODALITY) or "").upper() in applies.modalities]
    if not of_modality:
        present = sorted({(string(s, _MODALITY) or "no modality").upper() for s in series_json})
        raise NoApplicableImages(f"{scope} has no {modalities} series (it has {', '.join(present)}); {wants}")
    accepted = [s for s in of_modality if applies.accepts(string(s, _MODALITY), string(s, _BODY_PART))]
    if not accepted:
        parts = sorted({(string(s, _BODY_PART) or "unspecified body part").upper() for s in of_modality})
        raise NoApplicableImages(f"{scope} has {modalities} series only of {', '.join(parts)}; {wants}")

    def series_order(series: DicomJson) -> tuple[bool, int, str]:
        number = integer(series, _SERIES_NUMBER)
        return (number is None, number or 0, string(series, _SERIES_UID) or "")

    selections: list[SeriesSelection] = []
    too_small: list[str] = []
    for series in sorted(accepted, key=series_order):
        uid = string(series, _SERIES_UID)
        series_study = string(series, _STUDY_UID) or study_uid
        if uid is None or series_study is None:
            continue  # a PACS answer without UIDs cannot be retrieved
        refs: list[InstanceRef] = []
        for instance in instances_json_by_series.get(uid, []):
            sop_uid, sop_class = string(instance, _SOP_INSTANCE), string(instance, _SOP_CLASS)
            if sop_uid and sop_class and _is_image(instance):
                refs.append(InstanceRef(sop_uid, sop_class, integer(instance, _INSTANCE_NUMBER)))
        if len(refs) < applies.min_instances:
            too_small.append(f"series {uid} has {len(refs)} image instance(s)")
            continue
        refs.sort(key=_instance_order)
        modality = (string(series, _MODALITY) or "").upper()
        selections.append(
            SeriesSelection(series_study, uid, modality, string(series, _BODY_PART), tuple(refs))
        )
    if not selections:
        raise NoApplicableImages(
            f"in {scope}, {'; '.join(too_small) or 'no series has UIDs'}"
            f" (at least {applies.min_instances} needed); {wants}"
        )
    return selections


async def select_for_study(
    qido: DicomwebClient,
    study_uid: str,
    applies: Applicability,
    series_uid: str | None = None,
) -> list[SeriesSelection]:
    """`select_series` over the PACS: one series query, then one instance query per accepted series.

    Instances are listed only for series the model accepts, so a 20-series study with one
    applicable series costs two QIDO requests.
    """
    series_json = await qido.search_series({"StudyInstanceUID": study_uid}, include_fields=_SERIES_FIELDS)
    if not series_json:
        raise NoApplicableImages(f"study {study_uid} has no series in the PACS")
    wanted = [
        uid
        for s in series_json
        if (uid := string(s, _SERIES_UID))
        and (series_uid is None or uid == series_uid)
        and applies.accepts(string(s, _MODALITY), string(s, _BODY_PART))
    ]
    answers = await asyncio.gather(
        *(
            qido.search_instances(
                {"StudyInstanceUID": study_uid, "SeriesInstanceUID": uid}, include_fields=_INSTANCE_FIELDS
            )
            for uid in wanted
        )
    )
    return select_series(series_json, dict(zip(wanted, answers, strict=True)), applies, series_uid=series_uid)


def _first_frame(ds: pydicom.Dataset) -> np.ndarray:
    """Decode only frame 0; YBR_FULL/YBR_FULL_422/YBR_ICT/YBR_RCT come back as RGB."""
    transfer_syntax = getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    syntax = (
        f"{transfer_syntax.name} ({transfer_syntax})" if transfer_syntax else "an unknown transfer syntax"
    )
    sop_uid = ds.get("SOPInstanceUID", "?")
    if "PixelData" not in ds:
        raise UndecodableImage(f"instance {sop_uid} has no (7FE0,0010) Pixel Data", transfer_syntax)
    try:
        return pixel_array(ds, index=0)
    # The decoder plugins raise whatever their codec raises (RuntimeError from libjpeg,
    # NotImplementedError for a missing plugin, ValueError/AttributeError for bad attributes).
    except Exception as exc:
        raise UndecodableImage(
            f"cannot decode the pixel data of instance {sop_uid} in {syntax}: {exc}", transfer_syntax
        ) from exc


def _dicom_voi(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The image's own VOI transformation (PS3.3 C.11.2) on Modality LUT output, onto [0, 1], by
    pydicom's `apply_voi_lut`: the first VOI LUT Sequence item if there is one (C.11.2.1.1), else
    the first WindowCenter/WindowWidth with the VOILUTFunction (LINEAR by default, C.11.2.1.2.1;
    LINEAR_EXACT and SIGMOID, C.11.2.1.3). None when the image has neither, or nothing usable.

    pydicom scales its output to a range of its own (the LUT's entries; for a window, the stored
    range after rescale), so the result is brought to [0, 1] by that range: for a window, its
    output for -inf and +inf, for a LUT, its smallest and largest entry (some writers declare
    16-bit entries and use 12 bits, so the LUT's own span is used, not 2**bits - 1).
    """
    lut = ds.get("VOILUTSequence")
    if not lut and ("WindowCenter" not in ds or "WindowWidth" not in ds):
        return None
    try:
        if lut:
            # A LUT is indexed by integer input values (PS3.3 C.11.2.1.1).
            output = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
            entries, first_mapped = lut[0].LUTDescriptor[0] or 2**16, lut[0].LUTDescriptor[1]
            every = apply_voi_lut(np.arange(first_mapped, first_mapped + entries), ds, index=0)
            low, high = float(every.min()), float(every.max())
        else:
            output = apply_voi_lut(values, ds, index=0)
            low, high = (float(v) for v in apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0))
    # pydicom refuses a width below its function's minimum (ValueError), an unknown function or
    # LUT depth (ValueError/NotImplementedError), and missing attributes (AttributeError, KeyError).
    except (ValueError, NotImplementedError, AttributeError, KeyError, IndexError, TypeError):
        return None
    if not (np.isfinite(low) and np.isfinite(high)) or high == low:
        return None
    unit = (np.asarray(output, dtype=np.float64) - low) / (high - low)
    return unit if np.all(np.isfinite(unit)) else None


def _percentile_window(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:  # a constant image has no contrast to stretch
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _grayscale_unit(frame: np.ndarray, ds: pydicom.Dataset, windowing: str) -> np.ndarray:
    values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
    unit = _dicom_voi(values, ds) if windowing == "dicom" else None
    if unit is None:
        unit = _percentile_window(values)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _colour_unit(frame: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)  # uint8 or uint16, after the LUTs' bit depth
        return rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise UndecodableImage(f"expected 3 samples per pixel, decoded shape {frame.shape}")
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    return frame.astype(np.float64) / float(2**bits - 1)


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    plane = np.ascontiguousarray(plane, dtype=np.float32)
    if plane.shape != (height, width):
        # A 2-D float32 array becomes a mode 'F' image: bilinear on 32-bit floats, no 8-bit loss.
        plane = np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(plane, 0.0, 1.0)


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise ValueError(f"spec.{name} has {len(values)} values, expected 1 or {channels}")
    return np.asarray(values, dtype=np.float32)


def to_model_input(ds: pydicom.Dataset, spec: InputSpec) -> np.ndarray:
    """One instance as a float32 tensor: H x W x C for NHWC, C x H x W for NCHW.

    Follows the rules in this module's docstring; raises `UndecodableImage` (naming the transfer
    syntax) when the pixel data cannot be decoded.
    """
    frame = _first_frame(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel") or 1) == 3:
        unit = _colour_unit(frame, ds)
        if spec.channels == 1:
            unit = unit @ _LUMA
    elif frame.ndim == 2:
        unit = _grayscale_unit(frame, ds, spec.windowing)
    else:
        raise UndecodableImage(
            f"unsupported image: {photometric or 'no PhotometricInterpretation'}, shape {frame.shape}"
        )
    planes = [unit] if unit.ndim == 2 else [unit[..., index] for index in range(unit.shape[-1])]
    resized = [_resize(plane, spec.height, spec.width) for plane in planes]
    if len(resized) == 1 and spec.channels == 3:
        resized *= 3
    tensor = np.stack(resized, axis=-1)
    low, high = spec.scale
    tensor = tensor * np.float32(high - low) + np.float32(low)
    if spec.mean is not None:
        tensor = tensor - _per_channel(spec.mean, spec.channels, "mean")
    if spec.std is not None:
        tensor = tensor / _per_channel(spec.std, spec.channels, "std")
    if spec.layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor, dtype=np.float32)


async def iter_batches(
    wado: WadoClient,
    selection: SeriesSelection,
    spec: InputSpec,
    batch_size: int,
    on_dataset: Callable[[pydicom.Dataset], None] | None = None,
    executor: Executor | None = None,
) -> AsyncGenerator[tuple[list[InstanceRef], np.ndarray], None]:
    """Stream the selected series as (instances, N x input) batches, in the order the PACS sends.

    Each dataset is dropped as soon as it is decoded, so at most one batch of inputs and one
    dataset are alive at a time.
    Decoding runs in a worker thread: a JPEG 2000 slice takes long enough to stall the event loop.
    `on_dataset` sees each dataset before it is dropped (e.g. to keep a header without pixels).
    `executor`: the bounded pool decoding runs in (ADR 0036), shared by concurrent analyses so
    they neither starve the event loop nor grow the default pool; None: the loop's default.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = (
        (spec.height, spec.width, spec.channels)
        if spec.layout == "NHWC"
        else (spec.channels, spec.height, spec.width)
    )
    wanted = {ref.sop_instance_uid: ref for ref in selection.instances}
    pending_refs: list[InstanceRef] = []
    pending_rows: list[np.ndarray] = []

    async def add(ds: pydicom.Dataset) -> tuple[list[InstanceRef], np.ndarray] | None:
        ref = wanted.pop(str(ds.get("SOPInstanceUID", "")), None)
        if ref is None:
            return None  # not selected (e.g. a non-image object in the series), or a repeat
        loop = asyncio.get_running_loop()
        pending_rows.append(await loop.run_in_executor(executor, to_model_input, ds, spec))
        pending_refs.append(ref)
        if on_dataset is not None:
            on_dataset(ds)
        if len(pending_rows) < batch_size:
            return None
        return _take(pending_refs, pending_rows, shape)

    # One streamed series request (in the PACS's order: each slice is scored on its own, so the
    # order does not matter); any selected instance it did not deliver is asked for on its own.
    async def delivered() -> AsyncGenerator[pydicom.Dataset, None]:
        series = wado.iter_series(selection.study_uid, selection.series_uid)
        async with aclosing(series):
            async for ds in series:
                yield ds
        missing = [ref.sop_instance_uid for ref in selection.instances if ref.sop_instance_uid in wanted]
        if missing:
            instances = wado.iter_instances(selection.study_uid, selection.series_uid, missing)
            async with aclosing(instances):
                async for ds in instances:
                    yield ds

    datasets = delivered()
    async with aclosing(datasets):
        async for ds in datasets:
            ready = await add(ds)
            del ds
            if ready is not None:
                yield ready
    if pending_rows:
        yield _take(pending_refs, pending_rows, shape)


def _take(
    refs: list[InstanceRef], rows: list[np.ndarray], shape: tuple[int, int, int]
) -> tuple[list[InstanceRef], np.ndarray]:
    """The collected rows as one (N, ...) batch; empties the lists."""
    batch = np.empty((len(rows), *shape), dtype=np.float32)
    for index, row in enumerate(rows):
        batch[index] = row
    taken = list(refs)
    refs.clear()
    rows.clear()
    return taken, batch
