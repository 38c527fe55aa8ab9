"""A Subscription delivers only what its author may read (docs/adr/0026-subscriptions-design.md):
one created with a `patient/` token never carries another patient's event, not even as an id or an
event number, and `$events` replays with the caller's rights. SMART resource-server mode, tokens
from a test issuer, a real receiver."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, serve
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, TASK_TOPIC, _events, subscription, task

OWN, OTHER = "P-1001", "JP-0042"


@pytest.fixture(scope="module")
def secured(loaded_orthanc: EmbeddedOrthanc, receiver: Receiver) -> Iterator[tuple[LiveServer, TestIssuer]]:
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    try:
        with serve(
            {
                **issuer.facade_settings,
                "dicomweb_url": loaded_orthanc.dicomweb_url,
                "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
                "subscription_poll_interval": 0.05,
            },
            port=port,
        ) as server:
            yield server, issuer
    finally:
        issuer.close()


def test_a_patient_tokens_subscription_never_carries_another_patients_event(
    secured: tuple[LiveServer, TestIssuer], receiver: Receiver
) -> None:
    server, issuer = secured
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    own = {
        **FHIR_JSON,
        **issuer.headers("launch/patient patient/Subscription.cruds patient/Task.rs", patient=OWN),
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        body = subscription(TASK_TOPIC, receiver.url("mine"), "full-resource")
        created = ok_json(http.post("Subscription", json=body, headers=own), 201)
        deadline = time.monotonic() + 10
        while ok_json(http.get(f"Subscription/{created['id']}", headers=own))["status"] != "active":
            assert time.monotonic() < deadline, "never became active"
            time.sleep(0.05)
        ids = []
        for patient in (OTHER, OWN, OTHER, OWN):
            ids.append(ok_json(http.post("Task", json=task(patient), headers=admin), 201)["id"])
        receiver.wait_for(lambda: len(_events(receiver, "/mine")) == 2)
        time.sleep(0.5)  # the other patient's Tasks never come

        events = _events(receiver, "/mine")
        assert [n for n, _ in events] == [1, 2]  # no gaps: the others never got a number
        assert [b["entry"][1]["resource"]["id"] for _, b in events] == [ids[1], ids[3]]
        everything = json.dumps(receiver.bundles("/mine"))
        assert ids[0] not in everything and ids[2] not in everything and OTHER not in everything

        replay = ok_json(
            http.get(
                f"Subscription/{created['id']}/$events", params={"content": "full-resource"}, headers=own
            )
        )
        assert [e["event-number"] for e in status_of(replay)["events"]] == ["1", "2"]
        assert [e["resource"]["id"] for e in replay["entry"][1:]] == [ids[1], ids[3]]
        # Another caller without rights on Subscription learns nothing of it.
        stranger = issuer.headers("launch/patient patient/Task.rs", patient=OTHER)
        refused = http.get(f"Subscription/{created['id']}/$status", headers=stranger)
        assert refused.status_code == 403, refused.text


def test_only_its_author_and_system_callers_see_a_subscription(
    secured: tuple[LiveServer, TestIssuer], receiver: Receiver
) -> None:
    """A Subscription names its receiver and may carry the receiver's secrets (channel.header): other
    clients, even with read scopes on Subscription, get 404 alike for it, find nothing in searches
    and history, and cannot change or delete it (auth/author_only.py)."""
    server, issuer = secured
    scopes = "launch/patient patient/Subscription.cruds patient/Task.rs"
    author = {**FHIR_JSON, **issuer.headers(scopes, patient=OWN)}
    other_app = {**FHIR_JSON, **issuer.headers(scopes, patient=OWN, client_id="other-app")}
    other_user = {**FHIR_JSON, **issuer.headers(scopes, patient=OWN, sub="user-2")}
    admin = {**FHIR_JSON, **issuer.headers("system/Subscription.rs")}
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        body = subscription(TASK_TOPIC, receiver.url("secret"), "id-only")
        body["channel"]["header"] = ["Authorization: Bearer receiver-secret"]
        created = ok_json(http.post("Subscription", json=body, headers=author), 201)
        sid = created["id"]
        assert ok_json(http.get(f"Subscription/{sid}", headers=author))["id"] == sid
        assert sid in [
            e["resource"]["id"] for e in ok_json(http.get("Subscription", headers=author))["entry"]
        ]
        assert ok_json(http.get(f"Subscription/{sid}", headers=admin))["id"] == sid

        for stranger in (other_app, other_user):
            for url in (
                f"Subscription/{sid}",
                f"Subscription/{sid}/_history",
                f"Subscription/{sid}/_history/1",
            ):
                answer = http.get(url, headers=stranger)
                assert answer.status_code == 404, (url, answer.text)
                assert "receiver-secret" not in answer.text
            found = ok_json(http.get("Subscription", headers=stranger))
            assert sid not in json.dumps(found) and "receiver-secret" not in json.dumps(found)
            history = ok_json(http.get("Subscription/_history", headers=stranger))
            assert sid not in json.dumps(history)
            assert (
                http.put(f"Subscription/{sid}", json={**body, "id": sid}, headers=stranger).status_code == 404
            )
            assert http.delete(f"Subscription/{sid}", headers=stranger).status_code == 404
        assert (
            ok_json(http.get(f"Subscription/{sid}", headers=author))["channel"]["header"]
            == body["channel"]["header"]
        )
