"""The topics readable as resources (docs/adr/0026-subscriptions-design.md, addendum): each topic of
capability/topics/ is a read-only `Basic`-wrapped SubscriptionTopic (the Backport IG's R4 form),
found by `Basic?code=http://hl7.org/fhir/fhir-types|SubscriptionTopic`, valid FHIR R4B, naming
the same canonicals as the CapabilityStatement's `capabilitystatement-subscriptiontopic-canonical`
extensions; writes and deletes answer 405 and change nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import ok_json, serve, validate
from tests.subscriptions.test_rest_hook import FHIR_JSON, subscription

TOPIC_FOLDER = Path(__file__).resolve().parents[2] / "capability" / "topics"
CANONICAL = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
R5 = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic."
R4B = "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic."
IS_TOPIC = {"code": "http://hl7.org/fhir/fhir-types|SubscriptionTopic"}


@pytest.fixture(scope="module")
def http(orthanc: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    with (
        serve(
            {"dicomweb_url": orthanc.dicomweb_url, "subscription_endpoints": ["http://127.0.0.1:9/"]}
        ) as live,
        httpx.Client(base_url=f"{live.base_url}/", timeout=30, headers=FHIR_JSON) as client,
    ):
        yield client


def _shipped() -> dict[str, dict[str, Any]]:
    found = {}
    for path in TOPIC_FOLDER.glob("SubscriptionTopic-*.json"):
        topic = json.loads(path.read_text(encoding="utf-8"))
        found[topic["id"]] = topic
    return found


def _value(extension: dict[str, Any]) -> Any:
    return next(v for k, v in extension.items() if k.startswith("value"))


def test_topics_are_found_as_basic_and_match_the_capability_statement(http: httpx.Client) -> None:
    found = ok_json(http.get("Basic", params=IS_TOPIC))
    topics = {e["resource"]["id"]: e["resource"] for e in found["entry"]}
    assert set(topics) == set(_shipped()) and len(topics) == 4
    urls = {}
    for topic_id, basic in topics.items():
        validate(basic)
        assert basic["code"]["coding"] == [
            {"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}
        ]
        (status,) = basic["modifierExtension"]
        assert status == {"url": R5 + "status", "valueCode": "active"}
        urls[topic_id] = next(_value(e) for e in basic["extension"] if e["url"] == R5 + "url")
    statement = ok_json(http.get("metadata"))
    entries = {r["type"]: r for r in statement["rest"][0]["resource"]}
    advertised = {e["valueCanonical"] for e in entries["Subscription"]["extension"] if e["url"] == CANONICAL}
    assert advertised == set(urls.values()) == {t["url"] for t in _shipped().values()}
    basic_entry = entries["Basic"]
    assert {i["code"] for i in basic_entry["interaction"]} == {"read", "search-type"}
    assert {p["name"] for p in basic_entry["searchParam"]} == {"_id", "code"}
    # Another code finds none of them.
    assert (
        ok_json(http.get("Basic", params={"code": "http://hl7.org/fhir/fhir-types|Observation"}))["total"]
        == 0
    )


def test_a_topic_read_carries_its_trigger_and_filters(http: httpx.Client) -> None:
    basic = ok_json(http.get("Basic/service-request-status"))
    validate(basic)
    shipped = _shipped()["service-request-status"]
    by_url: dict[str, list[dict[str, Any]]] = {}
    for extension in basic["extension"]:
        by_url.setdefault(extension["url"], []).append(extension)
    assert _value(by_url[R5 + "title"][0]) == shipped["title"]
    (trigger,) = by_url[R4B + "resourceTrigger"]
    parts = [(p["url"], _value(p)) for p in trigger["extension"]]
    assert ("resource", "http://hl7.org/fhir/StructureDefinition/ServiceRequest") in parts
    assert [v for u, v in parts if u == "supportedInteraction"] == ["create", "update"]
    assert ("fhirPathCriteria", shipped["resourceTrigger"][0]["fhirPathCriteria"]) in parts
    filters = [
        next(_value(p) for p in f["extension"] if p["url"] == "filterParameter")
        for f in by_url[R4B + "canFilterBy"]
    ]
    assert filters == ["patient", "status", "code"]
    study = ok_json(http.get("Basic/imaging-study-available"))
    validate(study)
    triggers = [e["extension"] for e in study["extension"] if e["url"] == R4B + "eventTrigger"]
    codes = [_value(p)["coding"][0]["code"] for t in triggers for p in t if p["url"] == "event"]
    assert codes == ["study-available", "study-changed", "study-deleted"]
    assert all(
        ("resource", "http://hl7.org/fhir/StructureDefinition/ImagingStudy")
        in [(p["url"], _value(p)) for p in t]
        for t in triggers
    )
    # The canonical of a Basic topic is what a Subscription names.
    url = next(_value(e) for e in basic["extension"] if e["url"] == R5 + "url")
    ok_json(http.post("Subscription", json=subscription(url, "http://127.0.0.1:9/hook")), 201)


def test_topics_cannot_be_written_or_deleted(http: httpx.Client) -> None:
    before = ok_json(http.get("Basic/task-status"))
    changed = {**before, "modifierExtension": [{"url": R5 + "status", "valueCode": "retired"}]}
    for response in (
        http.put("Basic/task-status", json=changed),
        http.delete("Basic/task-status"),
        http.post("Basic", json={k: v for k, v in changed.items() if k != "id"}),
    ):
        assert response.status_code == 405, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    assert ok_json(http.get("Basic/task-status")) == before
    assert ok_json(http.get("Basic", params=IS_TOPIC))["total"] == 4
    assert http.get("Basic/no-such-topic").status_code == 404
