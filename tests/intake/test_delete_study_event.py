"""A study deleted through the facade is an event of the study topic (`study-deleted`): a real
Orthanc, a real receiver, a Subscription of `imaging-study-available` (ADR 0040)."""

from __future__ import annotations

import time

import httpx

from fhir_facade.embedded import EmbeddedOrthanc
from tests import dicom_factory
from tests.conftest import ok_json, serve
from tests.dicom_factory import SeriesSpec, StudySpec
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TOPICS, _events, subscription

STUDY = StudySpec(
    patient_id="DEL-EV-1", patient_name="EVENT^E", series=[SeriesSpec("MR", "T1", 1, n_instances=1)]
)


def test_a_deleted_study_notifies_its_subscribers(orthanc: EmbeddedOrthanc) -> None:
    with httpx.Client(timeout=30) as client:
        dicom_factory.upload(client, orthanc.url, dicom_factory.build_study(STUDY))
    receiver = Receiver()
    receiver.start()
    try:
        server = serve(
            {
                "dicomweb_url": orthanc.dicomweb_url,
                "orthanc_url": orthanc.url,
                "study_delete_enabled": True,
                "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
                "subscription_poll_interval": 0.05,
            }
        )
        with server, httpx.Client(base_url=server.base_url, timeout=30, headers=FHIR_JSON) as http:
            body = subscription(
                f"{TOPICS}/imaging-study-available",
                receiver.url("studies"),
                "id-only",
                ("ImagingStudy?modality=MR",),
            )
            created = ok_json(http.post("Subscription", json=body), 201)
            deadline = time.monotonic() + 10
            while ok_json(http.get(f"Subscription/{created['id']}"))["status"] != "active":
                assert time.monotonic() < deadline, "never became active"
                time.sleep(0.05)
            assert http.delete(f"ImagingStudy/{STUDY.study_uid}").status_code == 204
            receiver.wait_for(lambda: len(_events(receiver, "/studies")) == 1, timeout=15)
            ((number, bundle),) = _events(receiver, "/studies")
            event = status_of(bundle)["events"][0]
            assert number == 1
            assert event["focus"]["reference"].endswith(f"ImagingStudy/{STUDY.study_uid}")
            parameters = bundle["entry"][0]["resource"]["parameter"]
            fired = next(p for p in parameters if p["name"] == "notification-event")
            assert fired["extension"][0]["valueCoding"]["code"] == "study-deleted"
    finally:
        receiver.stop()
