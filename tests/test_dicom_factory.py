"""Self-test of the DICOM factory: the corpus must be valid Part 10 with correctly encoded names."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests.dicom_factory import (
    CORPUS,
    SeriesSpec,
    StudySpec,
    build_study,
    series_instance_uid,
    standard_corpus,
    to_bytes,
)


def _roundtrip(ds: pydicom.FileDataset) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def test_corpus_is_deterministic_and_complete() -> None:
    corpus = standard_corpus()
    assert len(corpus) == 8
    assert [s.study_uid for s in corpus] == [s.study_uid for s in standard_corpus()]
    assert len({s.study_uid for s in corpus}) == len(corpus)
    patients = {s.patient_id for s in corpus}
    assert len(patients) == 7  # P-1001 has two studies
    assert {s.timezone_offset for s in corpus} >= {"+0100", "-0500", "+0530", None}
    assert any(s.accession == "" for s in corpus)
    assert any(s.issuer_of_patient_id for s in corpus)


@pytest.mark.parametrize("key", sorted(CORPUS))
def test_study_roundtrips_through_part10(key: str) -> None:
    spec = CORPUS[key]
    datasets = build_study(spec)
    assert len(datasets) == spec.number_of_instances
    for original in datasets:
        ds = _roundtrip(original)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == spec.study_uid
        assert ds.PatientID == spec.patient_id
        assert str(ds.PatientName) == spec.patient_name
        assert ds.AccessionNumber == spec.accession
        assert ds.get("StudyDate") == spec.study_date
        assert ds.get("StudyTime") == spec.study_time
        assert ds.get("TimezoneOffsetFromUTC") == spec.timezone_offset
        assert ds.get("IssuerOfPatientID") == spec.issuer_of_patient_id
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_series_attributes_and_uids() -> None:
    spec = CORPUS["mueller_mr_brain"]
    datasets = [_roundtrip(ds) for ds in build_study(spec)]
    by_series: dict[str, list[pydicom.FileDataset]] = {}
    for ds in datasets:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert len(by_series) == 3
    for series in spec.series:
        members = by_series[series_instance_uid(spec.study_uid, series.number)]
        assert len(members) == series.n_instances
        assert sorted(int(ds.InstanceNumber) for ds in members) == list(range(1, series.n_instances + 1))
        assert {ds.get("BodyPartExamined") for ds in members} == {series.body_part}
        assert {ds.get("Laterality") for ds in members} == {series.laterality}
        assert {ds.SOPClassUID for ds in members} == {series.sop_class_uid}


def test_all_uids_unique_across_corpus() -> None:
    sop_uids = [ds.SOPInstanceUID for spec in standard_corpus() for ds in build_study(spec)]
    series_uids = {ds.SeriesInstanceUID for spec in standard_corpus() for ds in build_study(spec)}
    assert len(sop_uids) == len(set(sop_uids))
    assert len(series_uids) == sum(len(spec.series) for spec in standard_corpus())
    assert all(len(uid) <= 64 for uid in sop_uids)


def test_latin1_name_is_encoded_as_iso_ir_100() -> None:
    raw = to_bytes(build_study(CORPUS["mueller_mr_brain"])[0])
    assert "Müller^Hans".encode("latin-1") in raw
    assert "Müller".encode() not in raw
    assert str(_roundtrip(build_study(CORPUS["mueller_mr_brain"])[0]).PatientName) == "Müller^Hans"


def test_japanese_name_is_encoded_as_utf8() -> None:
    ds = build_study(CORPUS["yamada_mr"])[0]
    raw = to_bytes(ds)
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう".encode() in raw
    name = _roundtrip(ds).PatientName
    assert (name.alphabetic, name.ideographic, name.phonetic) == (
        "Yamada^Tarou",
        "山田^太郎",
        "やまだ^たろう",
    )


def test_odd_values_survive() -> None:
    no_date = _roundtrip(build_study(CORPUS["no_date_no_name"])[0])
    assert "StudyDate" not in no_date
    assert str(no_date.PatientName) == ""
    odd = _roundtrip(build_study(CORPUS["fraction_bad_pn"])[0])
    assert odd.StudyTime == "101530.123456"
    assert str(odd.PatientName) == "^^^"


def test_specs_validate_early() -> None:
    with pytest.raises(ValueError, match="sop_class"):
        SeriesSpec("US", "echo", 1)
    with pytest.raises(ValueError, match="no series"):
        build_study(StudySpec(patient_id="X", patient_name="X"))
