"""Patient confinement for DICOMweb: what a `patient/` token may see and store.

A SMART `patient/` grant confines the caller to the Patient in the token's launch context. On the
DICOM side that Patient is (PatientID, IssuerOfPatientID) (PS3.3 C.7.1.1; the FHIR id is decoded
with `parse_patient_resource_id`, ADR 0003), and a dataset belongs to it when both values are equal,
an absent or empty issuer counting as "no issuer": the same rule the ImagingStudy search applies.

What Orthanc 1.10.1 + DICOMweb plugin 1.7 does with the query (checked against the real server),
and so why the rules below are what they are:

- QIDO matches PatientID at every level, also `/series` and `/instances` at the root and below a
  study, so forcing PatientID into the query is enough to narrow every search.
- A repeated key is not an OR: the LAST value wins (`PatientID=P-1001&PatientID=JP-0042` returns
  JP-0042's studies), and the tag forms `00100020` and `0010,0020` are the same key as `PatientID`.
  Appending our value would therefore not be enough: every client spelling of the key is removed.
- Values are matched as patterns: `*` and `?` are wildcards and a comma (also `%2C`) separates
  alternatives, while other percent-escapes are not matched at all (see `qido_pattern`); so our
  PatientID is sent as a pattern that matches at least the patient, and every answer is filtered
  on the exact (PatientID, issuer). The query asks for both attributes with one `includefield`
  each (PatientID is in Orthanc's default answer at every level, the issuer is not; this Orthanc
  also takes a comma-separated list, checked, but one per attribute is what every server takes).
- An empty IssuerOfPatientID in a query is a universal match, so a patient without an issuer is
  told apart from one with the same PatientID and an issuer by the answer filter alone.
- Studies are keyed by patient AND StudyInstanceUID: an instance stored with another patient's
  StudyInstanceUID makes a second study of the same UID. WADO-RS then refuses the study itself
  (404, the UID is ambiguous) but serves any series under it by series UID, whichever patient the
  series belongs to. So a study is the patient's only when EVERY study of that UID is theirs; a
  check of "StudyInstanceUID + PatientID" would pass for the intruder's copy.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from fhir_facade.dicom_to_fhir.patient import parse_patient_resource_id
from fhir_facade.dicomweb.client import DicomJson
from fhir_facade.dicomweb_proxy.client import DicomwebProxyClient

__all__ = [
    "PATIENT_INCLUDE_FIELDS",
    "PatientKey",
    "PatientKeys",
    "asked_patient",
    "confined_query",
    "names_patient",
    "qido_pattern",
    "study_belongs_to",
    "uids_of_other_patients",
]

PATIENT_ID = "00100020"
ISSUER_OF_PATIENT_ID = "00100021"
STUDY_INSTANCE_UID = "0020000D"

#: Asked for in every confined QIDO query, so the exact match can be checked on each answer.
PATIENT_INCLUDE_FIELDS: tuple[tuple[str, str], ...] = (
    ("includefield", PATIENT_ID),
    ("includefield", ISSUER_OF_PATIENT_ID),
)

# Every spelling of the two keys a client could use to name a patient (keyword or tag, with or
# without the comma and parentheses), compared after `_normal_key`.
_PATIENT_KEYS = frozenset({"PATIENTID", PATIENT_ID, "ISSUEROFPATIENTID", ISSUER_OF_PATIENT_ID})

# Characters a QIDO value may carry as they are (RFC 3986 unreserved, less "~").
_LITERAL_CHARACTERS = frozenset(string.ascii_letters + string.digits + ".-_")

# UIDs per ownership query: keeps the URL of a large STOW's check well under common limits.
_UIDS_PER_QUERY = 50


def _normal_key(name: str) -> str:
    return "".join(c for c in name.upper() if c not in " (),")


def names_patient(name: str) -> bool:
    """Whether a QIDO query key means PatientID or IssuerOfPatientID, however it is spelled."""
    return _normal_key(name) in _PATIENT_KEYS


def _text(value: Any) -> str | None:
    """An LO value as the comparison sees it: trailing padding removed, empty = absent."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _json_value(ds: DicomJson, tag: str) -> Any:
    element = ds.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


@dataclass(frozen=True)
class PatientKey:
    """A DICOM patient: PatientID within IssuerOfPatientID (None: no issuer)."""

    patient_id: str
    issuer: str | None = None

    def __post_init__(self) -> None:
        if not self.patient_id:
            raise ValueError("patient_id must not be empty")

    @classmethod
    def from_resource_id(cls, resource_id: str) -> PatientKey:
        """The patient of a FHIR Patient id (ADR 0003); ValueError when it is not one of ours."""
        patient_id, issuer = parse_patient_resource_id(resource_id)
        return cls(patient_id, issuer)

    def matches(self, patient_id: Any, issuer: Any) -> bool:
        """Whether (PatientID, IssuerOfPatientID) values name this patient (padding ignored)."""
        return _text(patient_id) == self.patient_id and _text(issuer) == self.issuer

    def matches_json(self, ds: DicomJson) -> bool:
        """Whether a DICOM JSON dataset (PS3.18 F.2) is this patient's."""
        return self.matches(_json_value(ds, PATIENT_ID), _json_value(ds, ISSUER_OF_PATIENT_ID))

    def qido_params(self) -> list[tuple[str, str]]:
        """The QIDO matching keys that narrow a search to this patient (values unescaped)."""
        params = [("PatientID", self.patient_id)]
        if self.issuer is not None:
            params.append(("IssuerOfPatientID", self.issuer))
        return params

    def describe(self) -> str:
        return f"{self.patient_id} (issuer {self.issuer})" if self.issuer else self.patient_id


@dataclass(frozen=True)
class PatientKeys:
    """The DICOM patients a confined caller may reach: the one of a `patient/` token's launch context,
    or the list of a `user/` token's user (empty: none). Answers what a single PatientKey answers, for
    any of them."""

    keys: tuple[PatientKey, ...]

    @classmethod
    def from_resource_ids(cls, resource_ids: frozenset[str]) -> PatientKeys:
        """The patients of FHIR Patient ids; ValueError names an id that is not one of ours."""
        return cls(tuple(PatientKey.from_resource_id(rid) for rid in sorted(resource_ids)))

    def matches(self, patient_id: Any, issuer: Any) -> bool:
        return any(key.matches(patient_id, issuer) for key in self.keys)

    def matches_json(self, ds: DicomJson) -> bool:
        return any(key.matches_json(ds) for key in self.keys)

    def describe(self) -> str:
        return ", ".join(key.describe() for key in self.keys) or "(no patient)"


def qido_pattern(value: str) -> str:
    """A QIDO matching value that matches at least `value` at this Orthanc, written without
    percent-escapes.

    Orthanc 1.10.1's DICOMweb plugin matches none of `SP%20ACE`, `SP+ACE`, `%C3%9Cn%C3%AF` or
    `ST%2AAR` against the stored "SP ACE", "Ünï" and "ST*AR", and reads `%2C` as a list comma, so
    an escaped PatientID would match nothing (or split). Letters, digits, ".", "-" and "_" are sent
    as they are; any other ASCII character becomes the one-character wildcard "?", and a run of
    non-ASCII characters becomes "*" (a "?" does not match a multi-byte character there). The
    answer filter then keeps the exact patient only.
    """
    pattern: list[str] = []
    for char in value:
        if char in _LITERAL_CHARACTERS:
            pattern.append(char)
        elif char.isascii():
            pattern.append("?")
        elif not pattern or pattern[-1] != "*":
            pattern.append("*")
    return "".join(pattern)


def _wildcard(value: str) -> re.Pattern[str]:
    """A QIDO single-value match with `*` and `?` wildcards (PS3.4 C.2.2.2.4) as a regex."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value), re.S)


def asked_patient(raw_query: str) -> Callable[[DicomJson], bool]:
    """The client's own PatientID / IssuerOfPatientID keys of a QIDO query, as a test on answers.

    A confined search replaces those keys by the confined patient's (`confined_query`); when the
    caller may reach several patients (a `user/` grant over a user's list) each is searched, and
    without this test a search for one patient (OHIF asks `PatientID=<id>` for a patient's other
    studies) would answer all of them, another patient's studies listed as this patient's. Single
    value matching with `*`/`?` wildcards, an empty value matches everything (PS3.4 C.2.2.2); the
    last of a repeated key counts and a comma separates values, as at Orthanc.
    """
    asked: dict[str, str] = {}
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        normal = _normal_key(unquote_plus(name))
        if normal in ("PATIENTID", PATIENT_ID):
            asked[PATIENT_ID] = unquote_plus(value)
        elif normal in ("ISSUEROFPATIENTID", ISSUER_OF_PATIENT_ID):
            asked[ISSUER_OF_PATIENT_ID] = unquote_plus(value)
    # Orthanc reads a comma as a list of values (also for PatientID): any of them matches.
    tests = {
        tag: [_wildcard(v.strip()) for v in value.split(",") if v.strip()]
        for tag, value in asked.items()
        if value.strip()
    }

    def matches(ds: DicomJson) -> bool:
        return all(
            any(p.fullmatch(_text(_json_value(ds, tag)) or "") for p in patterns)
            for tag, patterns in tests.items()
        )

    return matches


def confined_query(raw_query: str, key: PatientKey) -> str:
    """The client's raw QIDO query string with every patient key replaced by `key`'s, and the
    patient attributes included in the answer so that it can be filtered exactly.

    The client's other pairs are kept byte for byte: this Orthanc does not decode percent-escapes
    the way a re-encoding would assume (see `qido_pattern`), so the proxy changes nothing it does
    not have to. Our keys come last, which is also the one Orthanc uses when a key repeats.
    """
    kept = [
        pair for pair in raw_query.split("&") if pair and not names_patient(unquote_plus(pair.split("=")[0]))
    ]
    ours = [f"{name}={qido_pattern(value)}" for name, value in key.qido_params()]
    ours += [f"{name}={value}" for name, value in PATIENT_INCLUDE_FIELDS]
    return "&".join(kept + ours)


async def study_belongs_to(
    client: DicomwebProxyClient, study_uid: str, key: PatientKey | PatientKeys
) -> bool:
    """Whether the PACS holds study `study_uid` and every study of that UID is `key`'s (one of them).

    One QIDO query by StudyInstanceUID alone (not also by PatientID: that would hide another
    patient's study of the same UID, see the module notes).
    """
    found = await client.search("/studies", [("StudyInstanceUID", study_uid), *PATIENT_INCLUDE_FIELDS])
    studies = [ds for ds in found if _json_value(ds, STUDY_INSTANCE_UID) == study_uid]
    return bool(studies) and all(key.matches_json(ds) for ds in studies)


async def uids_of_other_patients(
    client: DicomwebProxyClient,
    path: str,
    keyword: str,
    tag: str,
    uids: Sequence[str],
    key: PatientKey | PatientKeys,
) -> list[str]:
    """Those of `uids` (values of `keyword`/`tag` at the QIDO level `path`) that the PACS already
    holds for a patient other than `key`: a store under them would make the other patient's
    data ambiguous (Orthanc then refuses to retrieve it)."""
    wanted = sorted(set(uids))
    others: set[str] = set()
    for start in range(0, len(wanted), _UIDS_PER_QUERY):
        chunk = wanted[start : start + _UIDS_PER_QUERY]
        # A comma-separated value is a UID list (PS3.18 8.3.4.1 "UID list matching").
        params = [(keyword, ",".join(chunk)), ("includefield", tag), *PATIENT_INCLUDE_FIELDS]
        found = await client.search(path, params)
        for ds in found:
            uid = _json_value(ds, tag)
            if uid in chunk and not key.matches_json(ds):
                others.add(uid)
    return sorted(others)
