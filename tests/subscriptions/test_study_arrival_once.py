"""One study-available event per arrival, even when the watcher hands the study over again.

The change-feed watcher publishes a stable study strictly and retries it when any consumer failed
(watcher/change_feed.py); the subscription consumer then sees the same arrival twice. Here the
fault is real: a PostgreSQL trigger makes the first Task insert fail, so the arrival-Task consumer
fails on the first attempt (the subscription consumer records its event in that same attempt),
and the watcher's retry creates the Task and calls the subscription consumer again. The study's
fingerprint was recorded with the first attempt's event (study_changes.py), so the retry is a
replay: the receiver gets one notification, and one event row exists. Real Orthanc, watcher,
PostgreSQL store and receiver."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select, text

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.subscriptions.tables import EVENT
from tests.conftest import ok_json
from tests.dicom_factory import build_study, upload
from tests.subscriptions.conftest import watching_facade
from tests.subscriptions.receiver import Receiver
from tests.subscriptions.test_rest_hook import FHIR_JSON, TOPICS, _events, subscription
from tests.watcher.test_arrival_tasks import study

STUDY_TOPIC = f"{TOPICS}/imaging-study-available"
MR_UID = "1.2.826.0.1.3680043.8.498.79.1"

#: The first Task version insert fails (a sequence is not rolled back with the transaction).
FAULT = """
CREATE SEQUENCE first_task_fault;
CREATE FUNCTION first_task_fails() RETURNS trigger AS $$
BEGIN
  IF NEW.resource_type = 'Task' AND nextval('first_task_fault') = 1 THEN
    RAISE EXCEPTION 'injected fault: the first Task write fails';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER first_task_fails BEFORE INSERT ON resource_version
  FOR EACH ROW EXECUTE FUNCTION first_task_fails();
"""


def test_a_retried_arrival_is_one_event(
    pacs: EmbeddedOrthanc, postgres_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with (
        watching_facade(pacs, receiver, database_url=postgres_url, task_modalities=["MR"]) as server,
        httpx.Client(base_url=server.base_url, timeout=30, headers=FHIR_JSON) as http,
    ):
        with engine.begin() as connection:  # the schema exists now (the lifespan upgraded it)
            connection.execute(text(FAULT))
        body = subscription(STUDY_TOPIC, receiver.url("arrivals"), "id-only", ("ImagingStudy?modality=MR",))
        created = ok_json(http.post("Subscription", json=body), 201)
        deadline = time.monotonic() + 10
        while ok_json(http.get(f"Subscription/{created['id']}"))["status"] != "active":
            assert time.monotonic() < deadline, "never became active"
            time.sleep(0.05)
        with httpx.Client(timeout=30) as client:
            upload(client, pacs.url, build_study(study(MR_UID, "ACC-ONCE-1", "MR")))

        # The retry succeeded: the arrival Task exists, after the first Task write failed.
        deadline = time.monotonic() + 30
        while not ok_json(http.get("Task", params={"identifier": f"urn:dicom:uid|urn:oid:{MR_UID}"})).get(
            "entry"
        ):
            assert time.monotonic() < deadline, "the arrival Task was never created"
            time.sleep(0.2)
        with engine.connect() as connection:
            calls = connection.execute(text("SELECT last_value FROM first_task_fault")).scalar_one()
        assert calls >= 2, "the fault never fired: the study was handed over only once"

        receiver.wait_for(lambda: len(_events(receiver, "/arrivals")) >= 1, timeout=30)
        time.sleep(1.5)  # several watcher polls: a second event would be out by now
        assert [n for n, _ in _events(receiver, "/arrivals")] == [1]
        with engine.connect() as connection:
            rows = connection.execute(
                select(EVENT.c.event_number, EVENT.c.event_code).where(
                    EVENT.c.subscription_id == created["id"]
                )
            ).all()
        assert [tuple(r) for r in rows] == [(1, "study-available")]
    engine.dispose()
