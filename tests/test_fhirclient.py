"""The Python `fhirclient` library (SMART on FHIR's reference client) as a real FHIR client:
it reads the CapabilityStatement, reads and searches ImagingStudy and Patient, and parses them
with its own R4 models."""

from __future__ import annotations

from fhirclient import client
from fhirclient.models.imagingstudy import ImagingStudy
from fhirclient.models.patient import Patient

from tests.conftest import LiveServer
from tests.dicom_factory import CORPUS


def make_client(facade: LiveServer) -> client.FHIRClient:
    smart = client.FHIRClient(settings={"app_id": "fhir-facade-tests", "api_base": facade.base_url})
    assert smart.ready is False  # no auth server advertised: open server
    smart.prepare()
    return smart


def test_fhirclient_reads_and_searches(facade: LiveServer) -> None:
    smart = make_client(facade)
    spec = CORPUS["mueller_mr_brain"]
    study = ImagingStudy.read(spec.study_uid, smart.server)
    assert study.id == spec.study_uid
    assert study.numberOfSeries == 3 and study.series[0].bodySite.code == "69536005"
    assert study.subject.reference == "Patient/P-1001"

    patient = Patient.read_from(study.subject.reference, smart.server)
    assert patient.name[0].family == "Müller"

    found = list(ImagingStudy.where({"patient": "P-1001"}).perform_resources_iter(smart.server))
    assert sorted(s.id for s in found) == sorted(
        [CORPUS["mueller_mr_brain"].study_uid, CORPUS["mueller_ct_chest"].study_uid]
    )
