"""How the sync classifies upstream answers. HAPI's version-conflict 409 and throttling 429 are
faults the real test upstream cannot be made to produce, so these use httpx.MockTransport."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx

from fhir_facade.http_dates import http_date
from fhir_facade.sync.upstream import Outcome, UpstreamClient, UpstreamSettings

OO = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}


def client(handler: httpx.MockTransport) -> UpstreamClient:
    return UpstreamClient(UpstreamSettings(base_url="http://upstream.invalid/fhir"), transport=handler)


def answering(status: int, body: dict[str, object] | None = None, **headers: str) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body or {}, headers=headers))


def test_version_conflict_and_throttling_are_retried_with_retry_after() -> None:
    assert client(answering(409, OO)).put({"resourceType": "Task", "id": "a"}).outcome is Outcome.RETRY
    throttled = client(answering(429, OO, **{"Retry-After": "7"})).put({"resourceType": "Task", "id": "a"})
    assert (throttled.outcome, throttled.retry_after) == (Outcome.RETRY, 7.0)


def test_retry_after_may_be_an_http_date() -> None:
    """RFC 9110 10.2.3: Retry-After is delay-seconds or an HTTP-date; the date is a wait until then."""
    later = http_date(datetime.now(UTC) + timedelta(seconds=120))
    throttled = client(answering(503, OO, **{"Retry-After": later})).put({"resourceType": "Task", "id": "a"})
    assert throttled.outcome is Outcome.RETRY
    assert throttled.retry_after is not None and 115 <= throttled.retry_after <= 120
    passed = client(answering(503, OO, **{"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"}))
    assert passed.put({"resourceType": "Task", "id": "a"}).retry_after == 0.0


def test_a_validation_refusal_keeps_the_operation_outcome() -> None:
    refused = client(answering(422, OO)).put({"resourceType": "Task", "id": "a"})
    assert refused.outcome is Outcome.REFUSED
    assert json.loads(refused.detail) == OO


def test_deleting_what_is_gone_is_done() -> None:
    assert client(answering(404, OO)).delete("Task", "a").outcome is Outcome.DONE
    assert client(answering(410, OO)).delete("Task", "a").outcome is Outcome.DONE


def test_put_sends_our_id_and_not_our_meta() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    client(httpx.MockTransport(record)).put({"resourceType": "Task", "id": "a", "meta": {"versionId": "3"}})
    assert seen[0].method == "PUT" and seen[0].url.path == "/fhir/Task/a"
    assert "meta" not in json.loads(seen[0].content)


def test_batch_answers_per_entry() -> None:
    response = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"response": {"status": "201 Created"}},
            {"response": {"status": "422 Unprocessable Entity", "outcome": OO}},
            {"response": {"status": "503 Service Unavailable"}},
            {"response": {"status": "404 Not Found"}},
        ],
    }
    entries = [
        {"resource": {"resourceType": "Task", "id": n}, "request": {"method": "PUT", "url": f"Task/{n}"}}
        for n in "abc"
    ] + [{"request": {"method": "DELETE", "url": "Task/d"}}]
    answers = client(answering(200, response)).batch(entries)
    assert isinstance(answers, list)
    assert [a.outcome for a in answers] == [Outcome.DONE, Outcome.REFUSED, Outcome.RETRY, Outcome.DONE]
