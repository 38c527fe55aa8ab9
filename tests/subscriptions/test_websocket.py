"""The websocket channel and heartbeats (docs/adr/0028-websocket-channel.md): a real facade (uvicorn,
SQLite, real Orthanc, SMART resource-server mode with tokens from a test issuer) and a real
websocket client (the `websockets` package) on a loopback port. Events come from real writes
through the REST API; every Bundle and Parameters the server emits is validated as FHIR R4B."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.subscriptions.receiver import Receiver, status_of
from tests.subscriptions.test_rest_hook import FHIR_JSON, IG, TASK_TOPIC, subscription, task

TOKEN_SECONDS = 4
SCOPES = "user/Subscription.cruds user/Task.cruds"
HEARTBEAT = f"{IG}/backport-heartbeat-period"


@pytest.fixture(scope="module")
def secured(orthanc: EmbeddedOrthanc, receiver: Receiver) -> Iterator[tuple[LiveServer, TestIssuer]]:
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    try:
        with serve(
            {
                **issuer.facade_settings,
                "dicomweb_url": orthanc.dicomweb_url,
                "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
                "subscription_poll_interval": 0.05,
                "subscription_ws_token_seconds": TOKEN_SECONDS,
            },
            port=port,
        ) as server:
            yield server, issuer
    finally:
        issuer.close()


@pytest.fixture(scope="module")
def author(secured: tuple[LiveServer, TestIssuer]) -> Iterator[httpx.Client]:
    server, issuer = secured
    headers = {**FHIR_JSON, **issuer.headers(SCOPES)}
    with httpx.Client(base_url=server.base_url, timeout=30, headers=headers) as client:
        yield client


def websocket_subscription(content: str, code: str, heartbeat: int | None = None) -> dict[str, Any]:
    """A Task-topic websocket Subscription for Tasks of `code` (so each test sees only its own)."""
    body = subscription(TASK_TOPIC, "", content, (f"Task?code=http://example.org/task|{code}",))
    del body["channel"]["endpoint"]
    body["channel"]["type"] = "websocket"
    if heartbeat is not None:
        body["channel"]["extension"] = [{"url": HEARTBEAT, "valueUnsignedInt": heartbeat}]
    return body


def binding_token(client: httpx.Client, *ids: str) -> dict[str, Any]:
    """$get-ws-binding-token (instance level for one id, type level for several) as {name: value}."""
    if len(ids) == 1:
        answer = ok_json(client.get(f"Subscription/{ids[0]}/$get-ws-binding-token"))
    else:
        answer = ok_json(client.get("Subscription/$get-ws-binding-token", params=[("id", i) for i in ids]))
    assert answer["resourceType"] == "Parameters"
    found: dict[str, Any] = {}
    for parameter in answer["parameter"]:
        value = next(v for k, v in parameter.items() if k.startswith("value"))
        if parameter["name"] == "subscription":
            found.setdefault("subscription", []).append(value)
        else:
            found[parameter["name"]] = value
    return found


def receive(socket: ClientConnection, timeout: float = 15.0) -> dict[str, Any]:
    """The next notification on the socket, validated as an R4B Bundle."""
    bundle: dict[str, Any] = json.loads(socket.recv(timeout=timeout))
    validate(bundle)
    assert bundle["type"] == "history"
    assert bundle["entry"][0]["resource"]["resourceType"] == "Parameters"
    return bundle


@contextmanager
def bind(token: dict[str, Any]) -> Iterator[ClientConnection]:
    """A real websocket client on the token's websocket-url that has sent `bind-with-token`."""
    with connect(token["websocket-url"], open_timeout=10) as socket:
        socket.send(f"bind-with-token {token['token']}")
        yield socket


def subscription_of(bundle: dict[str, Any]) -> str:
    return str(status_of(bundle)["subscription"]["reference"].rsplit("/", 1)[-1])


def wait_status(client: httpx.Client, sid: str, wanted: str) -> None:
    deadline = time.monotonic() + 10
    while ok_json(client.get(f"Subscription/{sid}"))["status"] != wanted:
        assert time.monotonic() < deadline, f"Subscription/{sid} never became {wanted}"
        time.sleep(0.05)


def refused_with_policy_violation(socket: ClientConnection) -> None:
    with pytest.raises(ConnectionClosed) as closed:
        socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_bind_handshake_then_events_in_each_payload_mode(
    secured: tuple[LiveServer, TestIssuer], author: httpx.Client
) -> None:
    server, _ = secured
    ids = {
        content: ok_json(author.post("Subscription", json=websocket_subscription(content, "ws-modes")), 201)[
            "id"
        ]
        for content in ("full-resource", "id-only", "empty")
    }
    assert ok_json(author.get(f"Subscription/{ids['empty']}"))["status"] == "requested"
    before = datetime.now(UTC)
    token = binding_token(author, *ids.values())
    assert token["websocket-url"] == f"ws://127.0.0.1:{server.port}/fhir/subscriptions/ws"
    assert sorted(token["subscription"]) == sorted(f"Subscription/{i}" for i in ids.values())
    expiration = datetime.fromisoformat(token["expiration"])
    assert 0 < (expiration - before).total_seconds() <= TOKEN_SECONDS + 1
    assert len(token["token"]) >= 40

    with bind(token) as socket:
        handshakes = [receive(socket) for _ in ids]
        assert {status_of(b)["type"] for b in handshakes} == {"handshake"}
        assert {subscription_of(b) for b in handshakes} == set(ids.values())
        assert {status_of(b)["events-since-subscription-start"] for b in handshakes} == {"0"}
        # Binding made them active (a version written by the server) before the handshake went out.
        assert {status_of(b)["status"] for b in handshakes} == {"active"}
        for sid in ids.values():
            assert ok_json(author.get(f"Subscription/{sid}"))["status"] == "active"

        created = ok_json(author.post("Task", json=task("P-7", code="ws-modes")), 201)
        moved = ok_json(author.put(f"Task/{created['id']}", json={**created, "status": "in-progress"}))
        ok_json(author.post("Task", json=task("P-7", code="another-code")), 201)  # filtered out

        by_subscription: dict[str, list[dict[str, Any]]] = {sid: [] for sid in ids.values()}
        for _ in range(6):
            bundle = receive(socket)
            assert status_of(bundle)["type"] == "event-notification"
            by_subscription[subscription_of(bundle)].append(bundle)
        with pytest.raises(TimeoutError):
            socket.recv(timeout=0.7)  # nothing else: the other code's Task is no event of theirs

    for sid, bundles in by_subscription.items():
        assert [status_of(b)["events"][0]["event-number"] for b in bundles] == ["1", "2"], sid
    full = by_subscription[ids["full-resource"]]
    assert [b["entry"][1]["resource"]["status"] for b in full] == ["requested", "in-progress"]
    assert full[1]["entry"][1]["resource"]["meta"]["versionId"] == moved["meta"]["versionId"]
    assert status_of(full[1])["events"][0]["focus"]["reference"].endswith(
        f"Task/{created['id']}/_history/{moved['meta']['versionId']}"
    )
    only = by_subscription[ids["id-only"]]
    assert all("resource" not in b["entry"][1] for b in only)
    assert only[0]["entry"][1]["fullUrl"].endswith(f"Task/{created['id']}")
    empty = by_subscription[ids["empty"]]
    assert all(len(b["entry"]) == 1 and "focus" not in status_of(b)["events"][0] for b in empty)


def test_heartbeats_on_rest_hook_and_websocket(author: httpx.Client, receiver: Receiver) -> None:
    hooked = subscription(
        TASK_TOPIC, receiver.url("beat"), "id-only", ("Task?code=http://example.org/task|hb",)
    )
    hooked["channel"]["extension"] = [{"url": HEARTBEAT, "valueUnsignedInt": 1}]
    rest = ok_json(author.post("Subscription", json=hooked), 201)["id"]
    socketed = ok_json(author.post("Subscription", json=websocket_subscription("id-only", "hb", 1)), 201)[
        "id"
    ]

    with bind(binding_token(author, socketed)) as socket:
        assert status_of(receive(socket))["type"] == "handshake"
        started = time.monotonic()
        beat = receive(socket, timeout=10)
        assert status_of(beat)["type"] == "heartbeat"
        assert time.monotonic() - started >= 0.8  # not before the period
        assert subscription_of(beat) == socketed and "events" not in status_of(beat)
        assert status_of(receive(socket, timeout=10))["type"] == "heartbeat"  # and again

    def kinds() -> list[str]:
        return [status_of(b)["type"] for b in receiver.bundles("/beat")]

    receiver.wait_for(lambda: kinds().count("heartbeat") >= 2)
    assert kinds()[0] == "handshake"
    for bundle in receiver.bundles("/beat"):
        validate(bundle)
        assert subscription_of(bundle) == rest
    heartbeats = [b for b in receiver.bundles("/beat") if status_of(b)["type"] == "heartbeat"]
    assert status_of(heartbeats[0])["status"] == "active"
    assert "events" not in status_of(heartbeats[0])


def test_the_heartbeat_period_must_be_a_positive_integer(author: httpx.Client) -> None:
    for value in (0, -5, "10", 1.5):
        body = websocket_subscription("empty", "never")
        body["channel"]["extension"] = [{"url": HEARTBEAT, "valueUnsignedInt": value}]
        found = outcome(author.post("Subscription", json=body), 422, "invalid")
        assert found["issue"][0]["expression"] == ["Subscription.channel.extension"], value


def test_tokens_belong_to_their_caller_and_expire(
    secured: tuple[LiveServer, TestIssuer], author: httpx.Client, receiver: Receiver
) -> None:
    server, issuer = secured
    sid = ok_json(author.post("Subscription", json=websocket_subscription("id-only", "mine")), 201)["id"]
    other_app = {**FHIR_JSON, **issuer.headers(SCOPES, client_id="other-app")}
    other_user = {**FHIR_JSON, **issuer.headers(SCOPES, sub="user-2")}
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for stranger in (other_app, other_user):
            outcome(http.get(f"Subscription/{sid}/$get-ws-binding-token", headers=stranger), 404, "not-found")
            outcome(
                http.post(
                    "Subscription/$get-ws-binding-token",
                    json={"resourceType": "Parameters", "parameter": [{"name": "id", "valueId": sid}]},
                    headers=stranger,
                ),
                404,
                "not-found",
            )
        assert http.get(f"Subscription/{sid}/$get-ws-binding-token").status_code == 401  # no bearer
        # The other user's own token binds its own subscription only.
        theirs = ok_json(
            http.post("Subscription", json=websocket_subscription("id-only", "mine"), headers=other_user), 201
        )["id"]
        with httpx.Client(base_url=server.base_url, headers=other_user) as them:
            token = binding_token(them, theirs)
        with bind(token) as socket:
            assert subscription_of(receive(socket)) == theirs
            ok_json(author.post("Task", json=task("P-8", code="mine")), 201)
            bundle = receive(socket)  # the other user's subscription matched the Task too: its own event
            assert subscription_of(bundle) == theirs
    # A rest-hook subscription has no websocket binding; the type level needs ids.
    hook = ok_json(author.post("Subscription", json=subscription(TASK_TOPIC, receiver.url("x"))), 201)["id"]
    outcome(author.get(f"Subscription/{hook}/$get-ws-binding-token"), 422, "business-rule")
    outcome(author.get("Subscription/$get-ws-binding-token"), 400, "invalid")

    url = f"ws://127.0.0.1:{server.port}/fhir/subscriptions/ws"
    for bogus in ("bind-with-token not-a-token", "bind-with-token ", "hello"):
        with connect(url, open_timeout=10) as socket:
            socket.send(bogus)
            refused_with_policy_violation(socket)
    token = binding_token(author, sid)
    with connect(url, open_timeout=10) as idle:  # connected, never binds
        time.sleep(TOKEN_SECONDS + 0.5)
        with bind(token) as socket:
            refused_with_policy_violation(socket)  # expired
        refused_with_policy_violation(idle)  # closed: nothing bound within the token's lifetime


def test_a_reconnecting_client_replays_what_it_missed_with_events(author: httpx.Client) -> None:
    sid = ok_json(author.post("Subscription", json=websocket_subscription("id-only", "replay")), 201)["id"]
    with bind(binding_token(author, sid)) as socket:
        assert status_of(receive(socket))["type"] == "handshake"
        wait_status(author, sid, "active")
        first = ok_json(author.post("Task", json=task("P-9", code="replay")), 201)
        assert status_of(receive(socket))["events"][0]["event-number"] == "1"

    current = first  # the socket is gone: two events happen unseen
    for status in ("accepted", "in-progress"):
        current = ok_json(author.put(f"Task/{first['id']}", json={**current, "status": status}))

    with bind(binding_token(author, sid)) as socket:
        handshake = status_of(receive(socket))
        assert handshake["type"] == "handshake" and handshake["events-since-subscription-start"] == "3"
        replay = ok_json(author.get(f"Subscription/{sid}/$events", params={"eventsSinceNumber": "2"}))
        assert [e["event-number"] for e in status_of(replay)["events"]] == ["2", "3"]
        assert status_of(replay)["type"] == "query-event"
        ok_json(author.put(f"Task/{first['id']}", json={**current, "status": "completed"}))
        live = status_of(receive(socket))
        assert live["type"] == "event-notification" and live["events"][0]["event-number"] == "4"
    state = ok_json(author.get(f"Subscription/{sid}/$status"))
    assert status_of({"entry": state["entry"]})["events-since-subscription-start"] == "4"


def test_the_capability_statement_advertises_the_operation(author: httpx.Client) -> None:
    statement = ok_json(author.get("metadata"))
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription"]
    operations = {o["name"]: o["definition"] for o in entry["operation"]}
    assert operations["get-ws-binding-token"] == (
        "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/"
        "backport-subscription-get-ws-binding-token"
    )
    assert "websocket" in entry["documentation"]
