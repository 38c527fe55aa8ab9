"""The de-identification checked tag by tag against PS3.15 Table E.1-1 as kept in the repository
(mappings/ps3.15-table-e1-1.csv): a dataset holding every attribute of the table that pydicom's
dictionary knows, each with an identifying value, goes through the profile, and every row's action
is verified on the result. Pure: no PACS (the HTTP operation is tests/intake/test_deidentify_operation.py)."""

from __future__ import annotations

from datetime import date, timedelta

import pydicom
import pytest
from pydicom import examples
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fhir_facade.intake.deidentify_profile import (
    Option,
    Pseudonyms,
    Rule,
    burned_in_warning,
    deidentify_dataset,
    profile_table,
)

KEYS = Pseudonyms(b"test-secret-of-32-bytes-length!!")
NAME = "SMITH^JOHN"
ISSUER = "HOSPITAL-A"
ALL = frozenset(Option)
_VALUES: dict[str, object] = {
    "DA": "20200315",
    "TM": "101500",
    "DT": "20200315101500",
    "AS": "045Y",
    "PN": NAME,
    "IS": "12",
    "DS": "1.5",
    "US": 7,
    "SS": 7,
    "UL": 7,
    "SL": 7,
    "UV": 7,
    "SV": 7,
    "FL": 7.0,
    "FD": 7.0,
    "OB": b"\x01\x02",
    "OW": b"\x01\x02",
    "UN": b"\x01\x02",
    "CS": "SMITH",
    "AE": "SMITHAE",
    "AT": 0x00100010,
    "UR": "http://example.org/SMITH",
}


def _rows() -> list[tuple[int, Rule, str]]:
    """(tag, rule, VR) of every row with one tag that pydicom's dictionary has (not a pattern)."""
    rows = []
    for rule in profile_table().rules:
        if any(c in rule.tag for c in "XG"):
            continue
        tag = int(rule.tag, 16)
        if tag >> 16 in (0x0000, 0x0002):  # command and file meta groups never sit in a dataset
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        rows.append((tag, rule, vr.split(" or ")[0]))
    return rows


def _value(tag: int, vr: str) -> object:
    if vr == "UI":
        return f"1.2.826.0.1.3680043.8.498.{tag}"
    if vr == "SQ":
        item = Dataset()
        item.PatientName = NAME
        item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
        return Sequence([item])
    return _VALUES.get(vr, "SMITH note")


def _source() -> Dataset:
    ds = Dataset()
    ds.PatientID = "MRN-12345"
    for tag, _, vr in _rows():
        ds.add_new(tag, vr, _value(tag, vr))
    ds.PatientID = "MRN-12345"
    ds.PatientName = NAME
    ds.IssuerOfPatientID = ISSUER
    ds.add_new(0x00091001, "LO", "private SMITH")  # a private attribute
    ds.add_new(0x60003000, "OW", b"\x00\x01")  # overlay data (60XX,3000)
    return ds


def test_the_table_is_the_standards_shape() -> None:
    rules = profile_table().rules
    assert len(rules) > 600  # PS3.15 2024b lists 621 rows
    by_tag = {r.tag: r for r in rules}
    assert by_tag["00100010"].basic == "Z"  # Patient's Name
    assert by_tag["0020000D"].basic == "U"  # Study Instance UID
    assert by_tag["00100040"].options[Option.RETAIN_PATIENT_CHARACTERISTICS] == "K"  # Patient's Sex
    assert by_tag["00080020"].options[Option.RETAIN_MODIFIED_DATES] == "C"  # Study Date
    assert by_tag["00081030"].options[Option.CLEAN_DESCRIPTORS] == "C"  # Study Description


@pytest.mark.parametrize("options", [frozenset(), ALL], ids=["basic", "all-options"])
def test_every_attribute_of_the_table_is_handled_as_the_table_says(options: frozenset[Option]) -> None:
    source = _source()
    result = _source()
    deidentify_dataset(result, KEYS, options)
    offset = KEYS.day_offset("MRN-12345", ISSUER)
    checked = 0
    for tag, rule, vr in _rows():
        action = rule.action(options)
        before = source[tag].value
        where = f"{rule.attribute} ({rule.tag}) {rule.basic} -> {action}"
        if action == "X":
            assert tag not in result, where
            checked += 1
            continue
        assert tag in result, where
        after = result[tag].value
        if vr == "SQ":
            if action == "Z":
                assert len(after) == 0, where
            else:  # recursed: the item's own attributes went through the table
                assert all(NAME not in str(item.get("PatientName", "")) for item in after), where
                assert all(
                    item.ReferencedSOPInstanceUID == KEYS.uid("1.2.826.0.1.3680043.8.498.99")
                    for item in after
                ), where
        elif tag == 0x00100020:
            assert after == KEYS.patient_id("MRN-12345", ISSUER), where
        elif tag == 0x00100010:
            assert str(after) == KEYS.patient_name("MRN-12345", ISSUER), where
        elif action == "Z":
            assert after in (None, "", b""), where
        elif action == "D":
            assert after != before and "SMITH" not in str(after), where
        elif action == "U":
            assert after == KEYS.uid(str(before)), where
        elif action == "K":
            assert after == before, where
        elif action == "C":
            if vr == "DA":
                assert after == (date(2020, 3, 15) - timedelta(days=offset)).strftime("%Y%m%d"), where
            elif vr == "DT":
                assert after[:8] == (date(2020, 3, 15) - timedelta(days=offset)).strftime("%Y%m%d"), where
            elif vr == "TM":
                assert after == before, where  # whole days move; the time of day is no identifier
            elif isinstance(before, str):
                assert "SMITH" not in str(after).upper(), where
        checked += 1
    assert checked > 450
    assert 0x00091001 not in result  # private attributes go
    assert 0x60003000 not in result  # overlays go (60XX,3000)
    assert result.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in result.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100"
    assert set(codes[1:]) == ({"113107", "113108", "113105"} if options else set())
    assert result.LongitudinalTemporalInformationModified == ("MODIFIED" if options else "REMOVED")


def test_pixel_data_stay_byte_identical_and_uids_are_consistent() -> None:
    path = examples.get_path("ct")
    first, second = pydicom.dcmread(path), pydicom.dcmread(path)
    original = pydicom.dcmread(path)
    one = deidentify_dataset(first, KEYS, ALL)
    two = deidentify_dataset(second, KEYS, frozenset())
    assert first.PixelData == original.PixelData
    assert (one.study_instance_uid, one.sop_instance_uid) == (two.study_instance_uid, two.sop_instance_uid)
    assert one.study_instance_uid != original.StudyInstanceUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.PatientID == second.PatientID != original.PatientID
    other = Pseudonyms(b"another-secret-of-32-bytes-len!!")
    assert other.uid(original.StudyInstanceUID) != one.study_instance_uid  # keyed: no secret, no link


def test_burned_in_annotation_is_flagged() -> None:
    ds = Dataset()
    ds.BurnedInAnnotation = "YES"
    assert burned_in_warning(ds)[0] == "YES" and burned_in_warning(ds)[1]
    us = Dataset()
    us.Modality = "US"
    assert burned_in_warning(us)[0] == "unknown" and burned_in_warning(us)[1]
    sc = Dataset()
    sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert burned_in_warning(sc)[1]
    mr = Dataset()
    mr.Modality = "MR"
    mr.BurnedInAnnotation = "NO"
    assert burned_in_warning(mr) == ("NO", None)
