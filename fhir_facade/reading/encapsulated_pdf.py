"""The signed report as a DICOM Encapsulated PDF (PS3.3 A.45.1), so PACS users see it.

Built with pydicom: highdicom (0.28) has no Encapsulated Document class (`highdicom.legacy` is
the Legacy Converted Enhanced image IODs). Modules of the IOD (PS3.3 Table A.45.1-1): Patient,
General Study, Encapsulated Document Series, General Equipment, SC Equipment, Encapsulated
Document, SOP Common. Patient and study attributes are copied from the study in the PACS (its
QIDO-RS study-level answer), so the instance lands in the same study and patient.

Series Number: one new series per stored report version, numbered from 9801 up (one more than
the highest number in 9801-9899 already in the study): below the AI result series (9901 up, ADR
0020/0031) so a viewer lists the radiologist's report before the machine's.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from fhir_facade import __version__
from fhir_facade.dicomweb.query import tag_values

__all__ = [
    "ENCAPSULATED_PDF_STORAGE",
    "FIRST_REPORT_SERIES_NUMBER",
    "STUDY_FIELDS",
    "build_encapsulated_pdf",
    "next_report_series_number",
]

#: Encapsulated PDF Storage SOP Class (PS3.4 Annex B.5).
ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
FIRST_REPORT_SERIES_NUMBER = 9801
_LAST_REPORT_SERIES_NUMBER = 9899

#: The study-level attributes copied into the document (Patient and General Study modules).
STUDY_FIELDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def next_report_series_number(series: Iterable[dict[str, Any]]) -> int:
    """9801, or one more than the highest Series Number 9801-9899 among QIDO series results."""
    taken = [FIRST_REPORT_SERIES_NUMBER - 1]
    for item in series:
        for value in tag_values(item, "00200011"):
            try:
                number = int(str(value).strip())
            except ValueError:
                continue
            if FIRST_REPORT_SERIES_NUMBER <= number <= _LAST_REPORT_SERIES_NUMBER:
                taken.append(number)
    return min(max(taken) + 1, _LAST_REPORT_SERIES_NUMBER)


def build_encapsulated_pdf(
    study: Dataset,
    pdf: bytes,
    *,
    title: str,
    series_number: int,
    when: datetime | None = None,
) -> Dataset:
    """An Encapsulated PDF instance of `study` (a Dataset with the STUDY_FIELDS the PACS has)."""
    if not pdf.startswith(b"%PDF"):
        raise ValueError("pdf is not a PDF document")
    when = (when or datetime.now(UTC)).astimezone(UTC)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in STUDY_FIELDS:  # Patient, General Study: as the PACS holds them
        if keyword in study:
            setattr(ds, keyword, study[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # Type 2
    for keyword in ("StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    # Encapsulated Document Series (PS3.3 C.24.1)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Radiology report"
    # General Equipment, SC Equipment (PS3.3 C.7.5.1, C.8.6.1)
    ds.Manufacturer = "fhir-facade"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # workstation
    # Encapsulated Document (PS3.3 C.24.2)
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the patient is named in the document
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging study")]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB of even length (PS3.5 7.1.1); the trailing pad byte is a NUL after %%EOF (C.24.2.1)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
