"""The DICOM PS3.15 Basic Application Level Confidentiality Profile, as data and as one pure function.

The profile's table (PS3.15 Annex E, Table E.1-1: attribute, tag, Basic Profile action and the option
columns we implement) is `mappings/ps3.15-table-e1-1.csv`; this module reads it and applies it to a
pydicom Dataset, nested sequences included (PS3.15 E.3.1: the actions apply at any nesting level).
No I/O beyond reading the table; the operation (`deidentify.py`) fetches and stores (ADR 0040).

Actions (PS3.15 E.1.1): D dummy value, Z zero length (or a dummy), X remove, K keep, C clean, U a
new UID consistent within the set. A compound action (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) means the first
"unless required by the IOD"; without the IOD at hand we take the last, always conformant one (D, Z or U)
so the result stays a valid instance of its IOD. An applied option's K beats its C, and either beats
the Basic Profile. Private attributes (odd groups) are removed (the Retain Safe Private option is not
implemented), as are the repeating curve and overlay groups the table lists.

Pseudonyms and UIDs are keyed (HMAC-SHA256 with a secret of the deployment), so the same patient and
the same UID map to the same pseudonym across studies and runs, and the date shift of the "Retain
Longitudinal Temporal Information with Modified Dates" option is one offset per patient (intervals
between a patient's studies are kept).
"""

from __future__ import annotations

import csv
import enum
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from fhir_facade.package_data import data_path

__all__ = [
    "OPTION_CODES",
    "InstanceResult",
    "Option",
    "ProfileTable",
    "Pseudonyms",
    "burned_in_warning",
    "deidentify_dataset",
    "profile_table",
]

TABLE_FILE = "ps3.15-table-e1-1.csv"


class Option(enum.StrEnum):
    """The profile options implemented (PS3.15 E.3), by the code the operation's parameter takes."""

    RETAIN_MODIFIED_DATES = "retain-modified-dates"
    RETAIN_PATIENT_CHARACTERISTICS = "retain-patient-characteristics"
    CLEAN_DESCRIPTORS = "clean-descriptors"


#: The table's column of each option.
_COLUMN = {
    Option.RETAIN_MODIFIED_DATES: "retain_modified_dates",
    Option.RETAIN_PATIENT_CHARACTERISTICS: "retain_patient_characteristics",
    Option.CLEAN_DESCRIPTORS: "clean_descriptors",
}

#: DICOM CID 7050 "De-identification Method" codes (DCM), recorded in (0012,0064).
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: dict[Option, tuple[str, str]] = {
    Option.RETAIN_MODIFIED_DATES: (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    Option.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
}

_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_ISSUER = 0x00100021
#: Attributes added by the de-identification itself (PS3.15 E.1.1 items 6-7; PS3.3 C.7.1.1).
_ADDED = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "FL": 0.0,
    "FD": 0.0,
}
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "PN", "CS", "AE", "UC", "UR"})


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1."""

    tag: str  # 8 upper-case hex digits, or a pattern with X for "any digit" (50XXXXXX)
    attribute: str
    basic: str
    options: dict[Option, str]

    def action(self, applied: frozenset[Option]) -> str:
        """The single action for this row under the `applied` options (see the module docstring)."""
        chosen = [self.options[o] for o in Option if o in applied and self.options.get(o)]
        if "K" in chosen:
            return "K"
        if "C" in chosen:
            return "C"
        return resolve_basic(self.basic)


def resolve_basic(action: str) -> str:
    """X/Z/U* -> U, X/D, Z/D, X/Z/D -> D, X/Z -> Z; a single action is itself."""
    parts = [p.rstrip("*") for p in action.split("/")]
    return parts[-1]


class ProfileTable:
    """Table E.1-1 by tag, with the repeating-group rows (curves, overlays) as patterns."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._exact = {int(r.tag, 16): r for r in self.rules if "X" not in r.tag and "G" not in r.tag}
        self._patterns = [
            (re.compile("^" + r.tag.replace("X", "[0-9A-F]") + "$"), r)
            for r in self.rules
            if "X" in r.tag and "G" not in r.tag
        ]

    def rule(self, tag: int) -> Rule | None:
        found = self._exact.get(tag)
        if found is not None:
            return found
        text = f"{tag:08X}"
        return next((rule for pattern, rule in self._patterns if pattern.match(text)), None)


@cache
def profile_table() -> ProfileTable:
    """The bundled table (mappings/ps3.15-table-e1-1.csv), read once."""
    path = data_path("mappings") / TABLE_FILE
    with path.open(newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return ProfileTable(
            Rule(
                tag=row["tag"],
                attribute=row["attribute"],
                basic=row["basic"],
                options={o: row[_COLUMN[o]] for o in Option if row[_COLUMN[o]]},
            )
            for row in rows
        )


class Pseudonyms:
    """Keyed replacements: HMAC-SHA256 under the deployment's secret, so equal inputs give equal
    pseudonyms in every study and every run, and nobody without the secret can reverse or test them."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the de-identification secret must be at least 16 bytes")
        self._secret = secret

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """A UID under the 2.25 root (PS3.5 B.2: a UUID as an integer), 128 bits of the HMAC."""
        return "2.25." + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))

    def patient_id(self, patient_id: str, issuer: str = "") -> str:
        return "ANON-" + self._digest("patient", f"{issuer}\x00{patient_id}").hex()[:16].upper()

    def patient_name(self, patient_id: str, issuer: str = "") -> str:
        return "ANONYMOUS^" + self.patient_id(patient_id, issuer)[5:]

    def day_offset(self, patient_id: str, issuer: str = "") -> int:
        """Days every date of this patient moves back: 1 to 3650, the same in every study."""
        return 1 + int.from_bytes(self._digest("dates", f"{issuer}\x00{patient_id}")[:4], "big") % 3650


@dataclass
class InstanceResult:
    """What happened to one instance: its new UIDs and the warnings a reviewer must see."""

    source_sop_instance_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    burned_in_annotation: str  # YES, NO or unknown
    warnings: list[str] = field(default_factory=list)


def burned_in_warning(ds: Dataset) -> tuple[str, str | None]:
    """(BurnedInAnnotation as YES/NO/unknown, a warning or None). Pixel data are not cleaned (the
    Clean Pixel Data option is not implemented), so a YES, or an unknown on an ultrasound or a
    secondary capture (where text in the pixels is the rule), is flagged, never passed silently."""
    stated = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    state = stated if stated in ("YES", "NO") else "unknown"
    if state == "YES":
        return state, "BurnedInAnnotation is YES: the pixel data may show identifying text"
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    secondary = sop_class.startswith("1.2.840.10008.5.1.4.1.1.7") or modality in ("SC", "OT")
    if state == "unknown" and (modality == "US" or secondary):
        kind = "an ultrasound" if modality == "US" else "a secondary capture"
        return (
            state,
            f"BurnedInAnnotation is not stated for {kind}: check the pixel data for identifying text",
        )
    return state, None


class _Run:
    """One dataset's de-identification: the identifying strings to clean descriptors of, the
    patient's key for pseudonyms and date shift."""

    def __init__(self, ds: Dataset, table: ProfileTable, keys: Pseudonyms, options: frozenset[Option]):
        self.table = table
        self.keys = keys
        self.options = options
        self.patient_id = str(ds.get("PatientID", "") or "")
        self.issuer = str(ds.get("IssuerOfPatientID", "") or "")
        self.offset = keys.day_offset(self.patient_id, self.issuer)
        self.identifiers = _identifying_strings(ds)

    def apply(self, ds: Dataset) -> None:
        for element in list(ds):
            tag = int(element.tag)
            if BaseTag(tag).is_private:
                del ds[element.tag]
                continue
            if tag in _ADDED:
                continue
            rule = self.table.rule(tag)
            if rule is None:
                if element.VR == "SQ":
                    self._recurse(element)
                continue
            self._act(ds, element, rule.action(self.options))

    def _recurse(self, element: DataElement) -> None:
        for item in element.value or []:
            self.apply(item)

    def _act(self, ds: Dataset, element: DataElement, action: str) -> None:
        tag, vr = int(element.tag), element.VR
        if action == "X":
            del ds[element.tag]
        elif vr == "SQ":
            if action == "Z":
                element.value = Sequence()
            else:  # D, U, K, C: the items stay, each attribute in them goes through the table
                self._recurse(element)
        elif tag == _PATIENT_ID and action in ("Z", "D"):
            element.value = self.keys.patient_id(self.patient_id, self.issuer)
        elif tag == _PATIENT_NAME and action in ("Z", "D"):
            element.value = self.keys.patient_name(self.patient_id, self.issuer)
        elif action == "Z":
            element.value = None
        elif action == "D":
            element.value = _dummy(vr, self.keys, element.value)
        elif action == "U":
            element.value = _map_values(element.value, self.keys.uid)
        elif action == "C":
            self._clean(element)
        # K: kept as it is

    def _clean(self, element: DataElement) -> None:
        """C: dates move back by the patient's offset, times stay (whole days move); text loses
        every identifying string of the dataset (names, IDs, accession and institution)."""
        vr = element.VR
        if vr == "DA":
            element.value = _map_values(element.value, lambda v: _shift_date(v, self.offset))
        elif vr == "DT":
            element.value = _map_values(element.value, lambda v: _shift_date(v[:8], self.offset) + v[8:])
        elif vr in _TEXT_VRS and element.value is not None:
            # CS and AE allow no "*": the identifier is simply cut out of those
            mark = "" if vr in ("CS", "AE") else "***"
            element.value = _map_values(element.value, lambda text: self._scrub(text, mark))

    def _scrub(self, text: str, mark: str) -> str:
        for identifier in self.identifiers:
            text = re.sub(re.escape(identifier), mark, text, flags=re.IGNORECASE)
        return text


def _identifying_strings(ds: Dataset) -> list[str]:
    """The strings a descriptor must not contain: patient name parts, IDs, accession number,
    institution and physicians' names, longest first (so a name is removed before its parts)."""
    found: set[str] = set()
    for keyword in (
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "AccessionNumber",
        "InstitutionName",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "StudyID",
    ):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        for item in value if isinstance(value, MutableSequence | tuple) else [value]:
            text = str(item)
            found.add(text)
            found.update(part for part in re.split(r"[\^= ,]+", text) if len(part) >= 3)
    found.discard("")
    return sorted(found, key=len, reverse=True)


def _map_values(value: object, convert: Callable[[str], str]) -> object:
    """Apply `convert` to each value of a (possibly multi-valued) element; None stays None."""
    if value is None or value == "":
        return value
    if isinstance(value, MutableSequence | tuple):
        return [convert(str(v)) for v in value]
    return convert(str(value))


def _shift_date(value: str, days: int) -> str:
    """A DA value `days` earlier; a value that is no date is removed (it cannot be kept as is)."""
    try:
        moved = date(int(value[:4]), int(value[4:6]), int(value[6:8])) - timedelta(days=days)
    except (ValueError, IndexError):
        return ""
    return moved.strftime("%Y%m%d")


def _dummy(vr: str, keys: Pseudonyms, value: object) -> object:
    if vr == "UI":
        return _map_values(value, keys.uid)
    if vr in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[vr]
    if vr in ("OB", "OW", "OF", "OD", "OL", "UN"):
        return b""
    return _DUMMY_TEXT


def deidentify_dataset(
    ds: Dataset, keys: Pseudonyms, options: frozenset[Option] = frozenset(), table: ProfileTable | None = None
) -> InstanceResult:
    """De-identify `ds` in place (PS3.15 E.1.1) and record how (PS3.15 E.1.1 items 6-7): Patient
    Identity Removed YES, De-identification Method and its CID 7050 code sequence, and Longitudinal
    Temporal Information Modified. PixelData is never touched: its bytes stay identical."""
    source_uid = str(ds.get("SOPInstanceUID", ""))
    state, warning = burned_in_warning(ds)
    _Run(ds, table or profile_table(), keys, options).apply(ds)
    ds.PatientIdentityRemoved = "YES"
    applied = [o for o in Option if o in options]
    ds.DeidentificationMethod = "; ".join([BASIC_PROFILE_CODE[1], *(OPTION_CODES[o][1] for o in applied)])[
        :64
    ]
    codes = Sequence()
    for code, meaning in [BASIC_PROFILE_CODE, *(OPTION_CODES[o] for o in applied)]:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = (
        "MODIFIED" if Option.RETAIN_MODIFIED_DATES in options else "REMOVED"
    )
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return InstanceResult(
        source_sop_instance_uid=source_uid,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        burned_in_annotation=state,
        warnings=[warning] if warning else [],
    )
