"""Critical results (ADR 0034, issue 15 item 4): a signed report marked critical is sent, as a
Communication, to the practitioner who ordered the study, and tracked until acknowledged.

**Marked critical**: one of the report's `result` Observations (contained, as the sections of ADR
0033, or stored) has `interpretation` `AA` "Critical abnormal" (or `HH`/`LL`, critical high/low)
of the v3 ObservationInterpretation CodeSystem: R4's own flag for a result that needs immediate
attention (the HL7 v2 abnormal flag "AA"). R4 DiagnosticReport has no interpretation of its own.
The ACR Practice Parameter for Communication of Diagnostic Imaging Findings asks that findings
needing immediate or urgent intervention reach the ordering provider by a direct ("nonroutine")
communication, and that it be documented; the Communication is that record.

**The Communication** (written in the signed report's transaction, as the server's own work):
`status` in-progress (sent, not yet acknowledged), `category` alert
(communication-category), `priority` stat, `subject` the patient, `about` the report, `basedOn`
the order, `recipient` the order's `requester`, `sender` the first interpreter, `sent` now,
`payload` the report (contentReference) and its conclusion (contentString). The recipient's client
acknowledges by setting `status` completed, or by writing a Communication with `inResponseTo` it.
Unacknowledged, it is escalated by reading/escalation.py.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fhir_facade.auth.access import on_server_authority
from fhir_facade.fhir.internal_search import read_or_none
from fhir_facade.fhir.pipeline import EventBus, Origin, origin_scope
from fhir_facade.fhir.pipeline.events import ResourceChanged
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.reading.stage import SIGNED

__all__ = ["CRITICAL_CATEGORY", "CRITICAL_FLAGS", "INTERPRETATION", "CriticalResults", "is_critical"]

log = logging.getLogger(__name__)

INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: Critical abnormal, critical high, critical low.
CRITICAL_FLAGS = frozenset({"AA", "HH", "LL"})
CRITICAL_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/communication-category",
    "code": "alert",
    "display": "Alert",
}
CRITICAL_TOPIC = "Critical result"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _flagged(observation: dict[str, Any]) -> bool:
    return any(
        c.get("system") == INTERPRETATION and c.get("code") in CRITICAL_FLAGS
        for concept in observation.get("interpretation", [])
        for c in concept.get("coding", [])
    )


async def is_critical(report: dict[str, Any], observations: ResourceProvider) -> bool:
    """Whether a result Observation of the report (contained or stored) is flagged critical."""
    contained = {f"#{r.get('id')}": r for r in report.get("contained", [])}
    for item in report.get("result", []):
        reference = str(item.get("reference", ""))
        if reference in contained:
            if _flagged(contained[reference]):
                return True
            continue
        target = local_target(reference)
        if target is not None and target[0] == "Observation":
            stored = await read_or_none(observations, target[1])
            if stored is not None and _flagged(stored):
                return True
    return False


class CriticalResults:
    """Consumer of the event bus, inside the signed report's transaction (pipelined providers)."""

    def __init__(self, providers: dict[str, ResourceProvider]) -> None:
        self._observations = providers["Observation"]
        self._orders = providers["ServiceRequest"]
        self._communications = providers["Communication"]

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(ResourceChanged, self.on_report, in_transaction=True)

    async def on_report(self, event: ResourceChanged) -> None:
        if event.resource_type != "DiagnosticReport" or event.after is None:
            return
        report = event.after
        if report.get("status") != "final" or (event.before or {}).get("status") in SIGNED:
            return
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            if not await is_critical(report, self._observations):
                return
            communication = await self._communications.create(await self._communication(report))
            log.warning(
                "Critical result DiagnosticReport/%s: Communication/%s to %s",
                report["id"],
                communication["id"],
                [r.get("reference") for r in communication.get("recipient", [])] or "nobody (no requester)",
            )

    async def _communication(self, report: dict[str, Any]) -> dict[str, Any]:
        reference = {"reference": f"DiagnosticReport/{report['id']}"}
        communication: dict[str, Any] = {
            "resourceType": "Communication",
            "status": "in-progress",
            "category": [{"coding": [dict(CRITICAL_CATEGORY)]}],
            "priority": "stat",
            "topic": {"text": CRITICAL_TOPIC},
            "about": [reference],
            "sent": _now(),
            "payload": [{"contentReference": reference}],
        }
        if report.get("conclusion"):
            communication["payload"].append({"contentString": report["conclusion"]})
        if report.get("subject"):
            communication["subject"] = report["subject"]
        if report.get("resultsInterpreter"):
            communication["sender"] = report["resultsInterpreter"][0]
        orders = [
            b for b in report.get("basedOn", []) if str(b.get("reference", "")).startswith("ServiceRequest/")
        ]
        if orders:
            communication["basedOn"] = orders
            target = local_target(orders[0]["reference"])
            order = await read_or_none(self._orders, target[1]) if target else None
            if order is not None and order.get("requester"):
                communication["recipient"] = [order["requester"]]
        return communication
