"""One StudyInstanceUID stored under two patients (a mis-registered modality, a merge gone wrong):
Orthanc keeps two studies, and each ImagingStudy shows only its own patient's series, so a token
confined to one patient never sees the other's series through it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, series_instance_uid, upload

SHARED_UID = "1.2.826.0.1.3680043.8.498.4242.1"
OWN = StudySpec(
    patient_id="SHARE-A", patient_name="Alpha^Ann", study_uid=SHARED_UID, series=[SeriesSpec("MR", "T1 A", 1)]
)
OTHER = StudySpec(
    patient_id="SHARE-B", patient_name="Beta^Bob", study_uid=SHARED_UID, series=[SeriesSpec("MR", "T2 B", 2)]
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, TestIssuer]]:
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("shared-uid"),
        http_port=free_port(),
        dicom_port=free_port(),
        http_auth=False,  # loopback only; the credentialed path: tests/embedded/test_pacs_access.py
    ) as orthanc:
        with httpx.Client(timeout=30) as client:
            for spec in (OWN, OTHER):
                upload(client, orthanc.url, build_study(spec))
        port = free_port()
        issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
        settings = {
            **issuer.facade_settings,
            "dicomweb_url": orthanc.dicomweb_url,
        }
        with serve(settings, port=port) as server:
            yield server, issuer
        issuer.close()


def _series(study: dict[str, object]) -> set[str]:
    return {s["uid"] for s in study.get("series", [])}  # type: ignore[attr-defined, union-attr]


def test_each_patient_sees_only_its_own_series(shared: tuple[LiveServer, TestIssuer], tmp_path: Path) -> None:
    server, issuer = shared
    own_series, other_series = series_instance_uid(SHARED_UID, 1), series_instance_uid(SHARED_UID, 2)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for spec, mine, theirs in ((OWN, own_series, other_series), (OTHER, other_series, own_series)):
            headers = issuer.headers("launch/patient patient/ImagingStudy.rs", patient=spec.patient_id)
            (entry,) = ok_json(http.get("ImagingStudy", headers=headers))["entry"]
            assert entry["resource"]["subject"]["reference"] == f"Patient/{spec.patient_id}"
            assert _series(entry["resource"]) == {mine}, "the other patient's series stay out"
            assert theirs not in str(entry["resource"])
        unconfined = issuer.headers("user/ImagingStudy.rs")
        read = ok_json(http.get(f"ImagingStudy/{SHARED_UID}", headers=unconfined))
        patient = read["subject"]["reference"].removeprefix("Patient/")
        expected = own_series if patient == OWN.patient_id else other_series
        assert _series(read) == {expected}
        other = OTHER if patient == OWN.patient_id else OWN
        confined = issuer.headers("launch/patient patient/ImagingStudy.rs", patient=other.patient_id)
        # The read answers for one of the two studies; for the other patient that one is not theirs.
        outcome(http.get(f"ImagingStudy/{SHARED_UID}", headers=confined), 404, "not-found")
