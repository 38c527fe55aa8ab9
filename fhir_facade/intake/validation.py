"""Is this file an instance the PACS may take? Checked before anything of its study is stored.

Two layers (ADR 0038):

- **Every instance**, in process with pydicom: readable as DICOM Part 10; SOP Class, SOP Instance,
  Study and Series Instance UIDs present and valid (PS3.5 9.1: digits and dots, no leading zero,
  at most 64); the Type 1 attributes of the mandatory modules of its IOD present and not empty
  (PS3.3 tables, as highdicom ships them in `_standard/`); native pixel data as long as Rows x
  Columns x Samples per Pixel x Number of Frames x Bits Allocated / 8 (PS3.5 8.1.1, even-padded),
  Bits Stored <= Bits Allocated, High Bit = Bits Stored - 1 (PS3.3 C.7.6.3).
- **A real IOD validator**, `dciodvfy` of dicom3tools (Debian's `dicom3tools`), in a subprocess on
  the instances it is asked to check (the first of each series by default: it costs ~30 ms a file,
  whose structure the rest of the series shares). Its "Type 1" and "read failed" errors refuse the
  instance; its other errors and warnings are passed on as warnings.

`check_instance` never raises for bad input: whatever the file holds, the answer is a `Verdict`.
"""

from __future__ import annotations

import functools
import io
import json
import pkgutil
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

__all__ = ["DICM_OFFSET", "Verdict", "check_instance", "dciodvfy_available", "run_dciodvfy", "warm_up"]

#: Offset of the "DICM" prefix of a Part 10 file (PS3.10 7.1: 128-byte preamble).
DICM_OFFSET = 128

_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_OPTIONAL_UIDS = ("FrameOfReferenceUID",)
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Value representations whose values are text, padded with spaces (PS3.5 6.2).
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
#: dciodvfy errors that refuse an instance; its other errors are warnings (ADR 0038).
_DCIODVFY_REFUSES = re.compile(r"Type 1C? |read failed|Information Object Not found|Bad Value Length")
_DCIODVFY_TIMEOUT = 60.0
#: Values longer than this are not read while parsing (pixel data above all: only its length is
#: checked); a parse of a 512 x 512 CT image takes 0.3 ms instead of 1.6 ms.
_DEFER_BYTES = 16 * 1024
#: Modules whose attribute table lists the attributes of conditional macros at the top level (the
#: SR content item's value-type-specific attributes): only these of them are Type 1 for every file.
_CONDITIONAL_MODULES: dict[str, frozenset[str]] = {"sr-document-content": frozenset({"ValueType"})}


@dataclass
class Verdict:
    """What validation found: `errors` refuse the instance, `warnings` go with it into the PACS."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


@functools.cache
def _standard(name: str) -> Any:
    """highdicom's tables of the standard (PS3.3 IODs, modules and attributes), read once."""
    data = pkgutil.get_data("highdicom", f"_standard/{name}.json")
    if data is None:  # pragma: no cover - an installation without highdicom's data
        raise FileNotFoundError(f"highdicom/_standard/{name}.json")
    return json.loads(data)


@functools.cache
def _type1_keywords(sop_class_uid: str) -> tuple[tuple[str, str], ...] | None:
    """(module, keyword) of the top-level Type 1 attributes of the mandatory modules of the IOD of
    `sop_class_uid`; None for a SOP Class the tables do not know."""
    iod = _standard("sop_class_iod_map").get(sop_class_uid)
    if iod is None:
        return None
    attributes = _standard("module_attribute_map")
    required: list[tuple[str, str]] = []
    for module in _standard("iod_module_map").get(iod, []):
        if module.get("usage") != "M":
            continue
        for attribute in attributes.get(module["key"], []):
            keyword = attribute["keyword"]
            only = _CONDITIONAL_MODULES.get(module["key"])
            if only is not None and keyword not in only:
                continue
            if attribute.get("type") == "1" and not attribute.get("path"):
                required.append((module["key"], keyword))
    return tuple(required)


def _uid_problem(value: object) -> str | None:
    text = str(value)
    if not text:
        return "is empty"
    if not UID(text).is_valid:
        return f"{text!r} is not a valid UID (PS3.5 9.1)"
    return None


def _check_uids(ds: Dataset, verdict: Verdict) -> None:
    for keyword in _UID_KEYWORDS:
        if keyword not in ds:
            verdict.errors.append(f"{keyword} is missing")
            continue
        problem = _uid_problem(ds[keyword].value)
        if problem:
            verdict.errors.append(f"{keyword} {problem}")
    for keyword in _OPTIONAL_UIDS:
        if keyword in ds and ds[keyword].value not in (None, ""):
            problem = _uid_problem(ds[keyword].value)
            if problem:
                verdict.errors.append(f"{keyword} {problem}")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        verdict.errors.append("the File Meta Information has no TransferSyntaxUID")
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        if meta_keyword in meta and keyword in ds and str(meta[meta_keyword].value) != str(ds[keyword].value):
            verdict.warnings.append(f"{meta_keyword} differs from {keyword}")


def _check_type1(ds: Dataset, verdict: Verdict) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    required = _type1_keywords(sop_class) if sop_class else None
    if required is None:
        verdict.warnings.append(f"SOP Class {sop_class!r} is not in the IOD tables: Type 1 not checked")
        return
    for module, keyword in required:
        if keyword == "PixelData":
            continue  # its presence and size are checked below, without reading it
        tag = tag_for_keyword(keyword)
        element = ds.get_item(tag) if tag is not None else None
        if element is None:
            verdict.errors.append(f"Type 1 attribute {keyword} of module {module} is missing")
        elif _empty(element):
            verdict.errors.append(f"Type 1 attribute {keyword} of module {module} is empty")


def _empty(element: DataElement | RawDataElement) -> bool:
    """No value (PS3.5 7.4: zero length; padding alone is no value either). A raw element is judged
    by its bytes, without converting it (the cost of the parse is in the conversions)."""
    if isinstance(element, RawDataElement):
        if element.value is None:  # deferred: long, so not empty (its length is checked apart)
            return element.length == 0
        if element.VR in _TEXT_VRS:
            return not element.value.strip(b" \0")
        return element.length == 0
    value = element.value
    return value is None or value == "" or (isinstance(value, list | tuple | Sequence) and not value)


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    return int(value)


def _check_pixels(ds: Dataset, verdict: Verdict) -> None:
    pixel = ds.get_item("PixelData") if "PixelData" in ds else None
    sop_class = str(ds.get("SOPClassUID", ""))
    iod = _standard("sop_class_iod_map").get(sop_class)
    needs_pixels = iod is not None and any(
        m["key"] == "image-pixel" and m.get("usage") == "M" for m in _standard("iod_module_map").get(iod, [])
    )
    if pixel is None:
        if needs_pixels:
            verdict.errors.append(f"the {iod} IOD needs Pixel Data, and there is none")
        return
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    if not rows or not columns or not allocated:
        verdict.errors.append("Pixel Data without Rows, Columns and Bits Allocated")
        return
    if stored is not None and stored > allocated:
        verdict.errors.append(f"Bits Stored {stored} exceeds Bits Allocated {allocated}")
    high_bit = _int(ds, "HighBit")
    if stored is not None and high_bit is not None and high_bit != stored - 1:
        verdict.errors.append(f"High Bit {high_bit} is not Bits Stored - 1 ({stored - 1})")
    length = pixel.length if hasattr(pixel, "length") else len(pixel.value or b"")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and UID(str(syntax)).is_encapsulated:
        return  # compressed frames: their size says nothing; the decoder's checks are the PACS's
    if length == _UNDEFINED_LENGTH:
        verdict.errors.append("encapsulated Pixel Data in a native transfer syntax")
        return
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    frames = _int(ds, "NumberOfFrames", 1) or 1
    expected = (rows * columns * samples * frames * allocated + 7) // 8
    if length not in (expected, expected + 1):
        verdict.errors.append(
            f"Pixel Data holds {length} bytes; Rows {rows} x Columns {columns} x Samples {samples} x "
            f"Frames {frames} x {allocated} bits needs {expected}"
        )


def _check_lengths(ds: Dataset, size: int, verdict: Verdict) -> None:
    """Every value must lie inside the file, as long as its header says (PS3.5 7.1). pydicom reads a
    short last value without complaint, and skips a deferred one (pixel data) unread: a file cut
    short would otherwise pass with the length its header claims."""
    for element in ds.elements():  # as parsed: raw elements are not converted
        if (
            isinstance(element, RawDataElement)
            and element.length not in (0, _UNDEFINED_LENGTH)
            and element.value_tell + element.length > size
        ):
            verdict.errors.append(
                f"not readable as DICOM: the value of {element.tag} ends at byte "
                f"{element.value_tell + element.length}, after the end of the file ({size})"
            )


def check_instance(source: bytes | Path) -> Verdict:
    """Parse and check a Part 10 file, its bytes or at a path (long values such as pixel data are
    skipped, not read: their lengths are checked)."""
    verdict = Verdict()
    try:
        if isinstance(source, bytes):
            size = len(source)
            ds = pydicom.dcmread(io.BytesIO(source), defer_size=_DEFER_BYTES)
        else:
            size = source.stat().st_size
            ds = pydicom.dcmread(source, defer_size=_DEFER_BYTES)
    except Exception as error:  # pydicom raises many kinds for broken files: each is a refusal
        verdict.errors.append(f"not readable as DICOM: {type(error).__name__}: {error}"[:300])
        return verdict
    try:
        _check_lengths(ds, size, verdict)
        verdict.sop_instance_uid = str(ds.get("SOPInstanceUID", "")) or None
        verdict.sop_class_uid = str(ds.get("SOPClassUID", "")) or None
        verdict.study_uid = str(ds.get("StudyInstanceUID", "")) or None
        verdict.series_uid = str(ds.get("SeriesInstanceUID", "")) or None
        _check_uids(ds, verdict)
        _check_type1(ds, verdict)
        _check_pixels(ds, verdict)
    except Exception as error:  # a value pydicom parses lazily and fails on (bad VR, bad length)
        verdict.errors.append(f"not readable as DICOM: {type(error).__name__}: {error}"[:300])
    return verdict


def warm_up() -> None:
    """Read the standard's tables now (about 1.5 s), not in the first import."""
    for name in ("sop_class_iod_map", "iod_module_map", "module_attribute_map"):
        _standard(name)


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def run_dciodvfy(path: Path, verdict: Verdict) -> None:
    """Add dciodvfy's findings on `path` to `verdict` (ADR 0038: which refuse, which warn)."""
    try:
        done = subprocess.run(
            ["dciodvfy", str(path)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_DCIODVFY_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        verdict.warnings.append(f"dciodvfy did not finish within {_DCIODVFY_TIMEOUT:.0f} s")
        return
    seen: set[str] = set()
    for line in done.stderr.splitlines() + done.stdout.splitlines():
        if " - Error - " in line or line.startswith("Error - "):
            text = line.split("Error - ", 1)[1].strip()
            refuses = bool(_DCIODVFY_REFUSES.search(text))
            message = f"dciodvfy: {text}"
            if message in seen:
                continue
            seen.add(message)
            (verdict.errors if refuses else verdict.warnings).append(message[:300])
