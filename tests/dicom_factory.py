"""Builders of realistic DICOM studies, for tests that run against a real Orthanc.

The specs are plain dataclasses so a test can say what a study looks like (patients, time zones,
character sets, odd values) and assert the FHIR view against the same spec. Every UID below the
study is derived deterministically from the study UID, so uploading a corpus twice stores nothing
new (Orthanc answers "AlreadyStored") and tests may compute the UIDs they expect.

Encoding of names follows DICOM PS3.5 6.1 (Specific Character Set): pydicom encodes PN/LO/SH values
with the dataset's SpecificCharacterSet when it writes, so that attribute is set first.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from fhir_facade.demo.brain_mri import build_axial_study, build_demo_study
from fhir_facade.embedded import store_instances

__all__ = [
    "CORPUS",
    "CORPUS_ROOT",
    "SOP_CLASS_BY_MODALITY",
    "SeriesSpec",
    "StudySpec",
    "build_study",
    "demo_brain_study",
    "series_instance_uid",
    "sop_instance_uid",
    "standard_corpus",
    "to_bytes",
    "upload",
]

CORPUS_ROOT = "1.2.826.0.1.3680043.8.498."
"""UID root of the test corpus (pydicom's registered root, fine for synthetic data)."""

SOP_CLASS_BY_MODALITY: dict[str, str] = {
    "MR": str(MRImageStorage),
    "CT": str(CTImageStorage),
}
"""Default SOP Class per modality (PS3.4 B.5); other modalities must name theirs."""


@dataclass(frozen=True)
class SeriesSpec:
    """One series: what the FHIR ImagingStudy.series element is computed from."""

    modality: str
    description: str
    number: int
    body_part: str | None = None
    laterality: str | None = None
    n_instances: int = 2
    series_date: str | None = None
    series_time: str | None = None
    sop_class: str | None = None
    rows: int = 8
    cols: int = 8

    def __post_init__(self) -> None:
        if self.n_instances < 1:
            raise ValueError(f"n_instances must be >= 1, got {self.n_instances}")
        if self.sop_class is None:
            if self.modality not in SOP_CLASS_BY_MODALITY:
                raise ValueError(f"sop_class is required for modality {self.modality!r}")
            object.__setattr__(self, "sop_class", SOP_CLASS_BY_MODALITY[self.modality])

    @property
    def sop_class_uid(self) -> str:
        """The SOP Class UID, resolved from the modality when not given."""
        assert self.sop_class is not None  # set in __post_init__
        return self.sop_class


@dataclass(frozen=True)
class StudySpec:
    """One study of one patient; `None` means the attribute is absent from the datasets."""

    patient_id: str
    patient_name: str
    birth_date: str | None = None
    sex: str | None = None
    issuer_of_patient_id: str | None = None
    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    accession: str = ""
    study_date: str | None = None
    study_time: str | None = None
    timezone_offset: str | None = None
    description: str | None = None
    referring_physician: str | None = None
    specific_character_set: str | None = None
    study_id: str = "1"
    series: list[SeriesSpec] = field(default_factory=list)

    @property
    def number_of_instances(self) -> int:
        """Total instances, as ImagingStudy.numberOfInstances must report it."""
        return sum(s.n_instances for s in self.series)


def series_instance_uid(study_uid: str, series_number: int) -> str:
    """Deterministic SeriesInstanceUID: same spec, same UID, so re-uploads are no-ops."""
    return str(generate_uid(CORPUS_ROOT, entropy_srcs=[study_uid, "series", str(series_number)]))


def sop_instance_uid(series_uid: str, instance_number: int) -> str:
    """Deterministic SOPInstanceUID, derived like `series_instance_uid`."""
    return str(generate_uid(CORPUS_ROOT, entropy_srcs=[series_uid, "sop", str(instance_number)]))


def _pixels(rows: int, cols: int, seed: int) -> bytes:
    """A small gradient, different per instance, so Orthanc can decode and preview it."""
    ramp = np.add.outer(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64))
    return ((ramp * 37 + seed * 101) % 4096).astype("<u2").tobytes()


def _instance(spec: StudySpec, series: SeriesSpec, series_uid: str, number: int) -> FileDataset:
    sop_uid = sop_instance_uid(series_uid, number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(series.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = FileDataset(f"{sop_uid}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    # The character set first: pydicom encodes text VRs with it when the dataset is written.
    if spec.specific_character_set is not None:
        ds.SpecificCharacterSet = spec.specific_character_set
    ds.SOPClassUID = series.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    # Patient module (PS3.3 C.7.1.1)
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    if spec.issuer_of_patient_id is not None:
        ds.IssuerOfPatientID = spec.issuer_of_patient_id
    if spec.birth_date is not None:
        ds.PatientBirthDate = spec.birth_date
    if spec.sex is not None:
        ds.PatientSex = spec.sex

    # General Study module (PS3.3 C.7.2.1)
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyID = spec.study_id
    ds.AccessionNumber = spec.accession
    if spec.study_date is not None:
        ds.StudyDate = spec.study_date
    if spec.study_time is not None:
        ds.StudyTime = spec.study_time
    if spec.timezone_offset is not None:
        ds.TimezoneOffsetFromUTC = spec.timezone_offset
    if spec.description is not None:
        ds.StudyDescription = spec.description
    if spec.referring_physician is not None:
        ds.ReferringPhysicianName = spec.referring_physician

    # General Series module (PS3.3 C.7.3.1)
    ds.Modality = series.modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    if series.body_part is not None:
        ds.BodyPartExamined = series.body_part
    if series.laterality is not None:
        ds.Laterality = series.laterality
    if series.series_date is not None:
        ds.SeriesDate = series.series_date
    if series.series_time is not None:
        ds.SeriesTime = series.series_time
    ds.Manufacturer = "pydicom test factory"

    # Image plane + pixel modules (PS3.3 C.7.6.2, C.7.6.3): a tiny valid image.
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = series.cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(series.rows, series.cols, series.number * 1000 + number)
    return ds


def build_study(spec: StudySpec) -> list[FileDataset]:
    """Part 10 datasets (Explicit VR Little Endian) for every instance of every series."""
    if not spec.series:
        raise ValueError(f"study {spec.study_uid} has no series")
    numbers = [s.number for s in spec.series]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"study {spec.study_uid} repeats a series number: {numbers}")
    datasets: list[FileDataset] = []
    for series in spec.series:
        series_uid = series_instance_uid(spec.study_uid, series.number)
        for number in range(1, series.n_instances + 1):
            datasets.append(_instance(spec, series, series_uid, number))
    return datasets


def to_bytes(ds: FileDataset) -> bytes:
    """The dataset as a Part 10 file (preamble, DICM, file meta), as Orthanc wants it uploaded."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload(client: httpx.Client, orthanc_url: str, datasets: Iterable[FileDataset]) -> None:
    """Store the datasets in Orthanc (REST `POST /instances`), raising on any refusal."""
    store_instances(client, orthanc_url, datasets)


def _uid(n: int) -> str:
    return f"{CORPUS_ROOT}20240{n}"


def standard_corpus() -> list[StudySpec]:
    """The standard test corpus: 8 studies of 7 patients covering the mapping's edge cases."""
    return list(CORPUS.values())


CORPUS: dict[str, StudySpec] = {
    # Latin-1 name, issuer-less MRN, +0100, a three-series MR brain with one lateral series.
    "mueller_mr_brain": StudySpec(
        patient_id="P-1001",
        patient_name="Müller^Hans",
        birth_date="19650412",
        sex="M",
        study_uid=_uid(1),
        accession="ACC-1001",
        study_date="20240115",
        study_time="083000",
        timezone_offset="+0100",
        description="MRI BRAIN WITHOUT CONTRAST",
        referring_physician="Schmidt^Anna^^Dr.",
        specific_character_set="ISO_IR 100",
        series=[
            SeriesSpec(
                "MR",
                "SAG T1",
                1,
                body_part="HEAD",
                n_instances=3,
                series_date="20240115",
                series_time="083512",
            ),
            SeriesSpec(
                "MR",
                "AX T2 FLAIR",
                2,
                body_part="BRAIN",
                n_instances=2,
                series_date="20240115",
                series_time="084200",
            ),
            SeriesSpec(
                "MR",
                "COR T2 IAC LEFT",
                3,
                body_part="BRAIN",
                laterality="L",
                n_instances=2,
                series_date="20240115",
                series_time="085010",
            ),
        ],
    ),
    # Same patient, second study: a CT chest.
    "mueller_ct_chest": StudySpec(
        patient_id="P-1001",
        patient_name="Müller^Hans",
        birth_date="19650412",
        sex="M",
        study_uid=_uid(2),
        accession="ACC-1002",
        study_date="20240302",
        study_time="141500",
        timezone_offset="+0100",
        description="CT CHEST WITH CONTRAST",
        referring_physician="Schmidt^Anna^^Dr.",
        specific_character_set="ISO_IR 100",
        series=[SeriesSpec("CT", "CHEST 1.25mm", 1, body_part="CHEST", n_instances=4)],
    ),
    # UTF-8 Japanese name with alphabetic, ideographic and phonetic groups (PS3.5 6.2.1.1, Annex H).
    "yamada_mr": StudySpec(
        patient_id="JP-0042",
        patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
        birth_date="19800101",
        sex="M",
        study_uid=_uid(3),
        accession="ACC-3003",
        study_date="20240610",
        study_time="093000",
        timezone_offset="+0900",
        description="MRI LUMBAR SPINE",
        specific_character_set="ISO_IR 192",
        series=[SeriesSpec("MR", "SAG T2", 1, body_part="LSPINE", n_instances=2)],
    ),
    # Patient ID qualified by an issuer; US east coast offset.
    "issuer_ct": StudySpec(
        patient_id="MRN-555",
        patient_name="Doe^Jane",
        birth_date="19901120",
        sex="F",
        issuer_of_patient_id="HOSPITAL-A",
        study_uid=_uid(4),
        accession="ACC-4004",
        study_date="20240201",
        study_time="230000",
        timezone_offset="-0500",
        description="CT HEAD WITHOUT CONTRAST",
        referring_physician="House^Gregory",
        series=[SeriesSpec("CT", "HEAD AXIAL", 1, body_part="HEAD", n_instances=2)],
    ),
    # Mixed modalities in one study, India offset.
    "sharma_mixed": StudySpec(
        patient_id="IN-7007",
        patient_name="Sharma^Priya",
        birth_date="19750505",
        sex="F",
        study_uid=_uid(5),
        accession="ACC-5005",
        study_date="20240420",
        study_time="101500",
        timezone_offset="+0530",
        description="MR AND CT ABDOMEN",
        specific_character_set="ISO_IR 100",
        series=[
            SeriesSpec("MR", "AX T1 ABDOMEN", 1, body_part="ABDOMEN", n_instances=2),
            SeriesSpec("CT", "ABDOMEN PORTAL VENOUS", 2, body_part="ABDOMEN", n_instances=3),
        ],
    ),
    # Empty accession and no time zone offset (the facade's dicom_timezone applies).
    "no_accession": StudySpec(
        patient_id="P-2002",
        patient_name="Smith^John^Q",
        birth_date="19551231",
        sex="M",
        study_uid=_uid(6),
        accession="",
        study_date="20231224",
        study_time="120000",
        timezone_offset=None,
        description="CT CHEST LOW DOSE",
        series=[SeriesSpec("CT", "LUNG 1mm", 1, body_part="CHEST", n_instances=2)],
    ),
    # Odd: no StudyDate at all, an empty PatientName, no sex or birth date.
    "no_date_no_name": StudySpec(
        patient_id="ANON-0001",
        patient_name="",
        study_uid=_uid(7),
        accession="ACC-7007",
        study_date=None,
        study_time="101010",
        description="MR KNEE",
        series=[SeriesSpec("MR", "SAG PD", 1, body_part="KNEE", laterality="R", n_instances=1)],
    ),
    # Odd: StudyTime with a fraction and a PN made only of separators.
    "fraction_bad_pn": StudySpec(
        patient_id="P-3003",
        patient_name="^^^",
        birth_date="20000229",
        sex="O",
        study_uid=_uid(8),
        accession="ACC-8008",
        study_date="20240229",
        study_time="101530.123456",
        timezone_offset="+0000",
        description="CT ABDOMEN",
        series=[SeriesSpec("CT", "ABDOMEN", 1, body_part="ABDOMEN", n_instances=1)],
    ),
}
"""The standard corpus by short key; tests assert the FHIR view against these specs."""


def demo_brain_study(study_uid: str, patient_id: str, n_slices: int) -> list[FileDataset]:
    """The demo's real Colin27 MR slices (what $analyze's model reads), renamed to a study and patient
    of the test's own, so tests do not share the demo study's state."""
    return _renamed(build_demo_study(n_slices), study_uid, patient_id)


def colin27_axial_range(study_uid: str, patient_id: str, step: int) -> list[FileDataset]:
    """Every `step`-th axial slice of the whole Colin27 volume (k = 0, step, ... < 181: from below
    the cerebellum to above the vertex, the slices the demo leaves out included), renamed like
    `demo_brain_study`."""
    return _renamed(build_axial_study(list(range(0, COLIN27_AXIAL_SLICES, step))), study_uid, patient_id)


#: Axial slices of the Colin27 volume Debian's mricron-data ships (181 x 217 x 181 voxels).
COLIN27_AXIAL_SLICES = 181


def _renamed(datasets: list[FileDataset], study_uid: str, patient_id: str) -> list[FileDataset]:
    series_uid = f"{study_uid}.1"
    for number, ds in enumerate(datasets, start=1):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{number}"
        ds.PatientID = patient_id
    return datasets
