"""The facade's own topic: a study became available in the PACS. A real Orthanc's change feed, the
watcher in the facade's lifespan, a real receiver: an MR study sent to Orthanc reaches an
`ImagingStudy?modality=MR` subscription as the live ImagingStudy; a CT study does not."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import ok_json
from tests.dicom_factory import build_study, upload
from tests.subscriptions.conftest import watching_facade
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TOPICS, _events, subscription
from tests.watcher.test_arrival_tasks import study

STUDY_TOPIC = f"{TOPICS}/imaging-study-available"
MR_UID = "1.2.826.0.1.3680043.8.498.78.1"
CT_UID = "1.2.826.0.1.3680043.8.498.78.2"


def test_a_study_sent_to_the_pacs_notifies_with_the_live_imaging_study(
    pacs: EmbeddedOrthanc, tmp_path: Path
) -> None:
    receiver = Receiver()
    receiver.start()
    try:
        with (
            watching_facade(pacs, receiver) as server,
            httpx.Client(base_url=server.base_url, timeout=30, headers=FHIR_JSON) as http,
        ):
            body = subscription(
                STUDY_TOPIC, receiver.url("studies"), "full-resource", ("ImagingStudy?modality=MR",)
            )
            created = ok_json(http.post("Subscription", json=body), 201)
            deadline = time.monotonic() + 10
            while ok_json(http.get(f"Subscription/{created['id']}"))["status"] != "active":
                assert time.monotonic() < deadline, "never became active"
                time.sleep(0.05)
            with httpx.Client(timeout=30) as client:
                upload(client, pacs.url, build_study(study(CT_UID, "ACC-S-2", "CT")))
                upload(client, pacs.url, build_study(study(MR_UID, "ACC-S-1", "MR")))
            receiver.wait_for(lambda: len(_events(receiver, "/studies")) == 1, timeout=30)
            time.sleep(2.5)  # the CT is stable by now too, and never notified

            ((number, bundle),) = _events(receiver, "/studies")
            assert number == 1
            focus = bundle["entry"][1]["resource"]
            assert focus["resourceType"] == "ImagingStudy" and focus["id"] == MR_UID
            assert status_of(bundle)["events"][0]["focus"]["reference"].endswith(f"ImagingStudy/{MR_UID}")
    finally:
        receiver.stop()
