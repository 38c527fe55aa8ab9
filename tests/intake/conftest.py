"""Intake test fixtures: each module gets its own real Orthanc (empty), and a facade on it."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import pytest
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from tests import dicom_factory

STORE_AET = "RECONCILE1"
"""The AE title the tests' storescu sends as: a modality the module's Orthanc accepts."""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    """The module's own Orthanc, empty at the start, loopback without credentials; it accepts
    C-STORE from `STORE_AET` (storescu in the reconciliation tests)."""
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-intake"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        http_auth=False,
        modalities=[DicomPeer(STORE_AET, "127.0.0.1")],
    ) as instance:
        yield instance


def zip_of(files: dict[str, bytes]) -> bytes:
    """A zip archive (deflated) of name -> content, names with folders as given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def study_files(spec: dicom_factory.StudySpec) -> list[bytes]:
    datasets: list[FileDataset] = dicom_factory.build_study(spec)
    return [dicom_factory.to_bytes(ds) for ds in datasets]


def multipart_related(parts: list[bytes], boundary: str = "import-boundary-1") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def valid_ct_study(
    patient_id: str,
    patient_name: str = "Import^Test",
    *,
    n_instances: int = 3,
    rows: int = 16,
    cols: int = 16,
    accession: str = "",
) -> list[FileDataset]:
    """A CT study whose instances pass validation (the factory's leave out some Type 1 attributes of
    the CT Image IOD; validation refuses those, see test_validation.py)."""
    spec = dicom_factory.StudySpec(
        patient_id=patient_id,
        patient_name=patient_name,
        birth_date="19700101",
        sex="F",
        accession=accession,
        study_date="20261201",
        series=[
            dicom_factory.SeriesSpec(
                modality="CT", description="chest", number=1, n_instances=n_instances, rows=rows, cols=cols
            )
        ],
    )
    frame_of_reference = generate_uid()
    datasets = dicom_factory.build_study(spec)
    for ds in datasets:
        ds.FrameOfReferenceUID = frame_of_reference
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    return datasets
