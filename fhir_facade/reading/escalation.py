"""Acknowledgement and escalation of critical results (ADR 0034; reading/critical.py).

- **Acknowledged**: the recipient's client sets the Communication's `status` to completed, or
  writes a Communication with `inResponseTo` it; the latter completes the original too (in the
  reply's transaction; R4 has no `in-response-to` search parameter, so the original's status is
  what a check can search).
- **Escalated**: a check every `critical_check_interval` seconds finds the critical Communications
  still `in-progress` whose `sent` is older than `critical_ack_timeout` and, once each (a Task with
  `focus` the Communication is looked for first, atomically, as the worklist's Tasks), writes a
  `stat` Task (code `critical-result-follow-up`, `focus` the Communication, `for` the patient,
  `basedOn` the order, `input` the report) for a person to follow up by phone, and an AuditEvent
  (the server as agent; entities the Communication, the report, the Task). The Communication stays
  `in-progress`: the recipient may still acknowledge it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from fhir_facade.audit.event import SERVER_AGENT, audit_event_narrative
from fhir_facade.audit.interaction import DCM
from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.auth.access import on_server_authority
from fhir_facade.fhir.conditional_guard import ConditionalGuard, guarded
from fhir_facade.fhir.internal_search import SearchBuilder, read_or_none
from fhir_facade.fhir.narrative import with_narrative
from fhir_facade.fhir.pipeline import EventBus, Origin, origin_scope
from fhir_facade.fhir.pipeline.events import ResourceChanged
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.reading.codes import TASK_CODE_SYSTEM
from fhir_facade.reading.critical import CRITICAL_CATEGORY

__all__ = ["FOLLOW_UP_CODE", "CriticalEscalation", "escalation_audit_event"]

log = logging.getLogger(__name__)

#: The facade's Task code (capability/CodeSystem-task-code.json) of an unacknowledged critical result.
FOLLOW_UP_CODE = {
    "system": TASK_CODE_SYSTEM,
    "code": "critical-result-follow-up",
    "display": "Follow up an unacknowledged critical result",
}
#: DICOM PS3.16 CID 400 "Patient Record" (a Task about the patient is created) is the type;
#: the subtype says why.
_PATIENT_RECORD: Final = {"system": DCM, "code": "110110", "display": "Patient Record"}
_APPLICATION: Final = {"system": DCM, "code": "110150", "display": "Application"}
_SUBTYPE: Final = {
    "system": "http://fhir-facade.org/fhir/CodeSystem/task-code",
    "code": "critical-result-follow-up",
    "display": "Follow up an unacknowledged critical result",
}
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_BATCH = 100


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entity(reference: str, role: str, display: str) -> dict[str, Any]:
    return {
        "what": {"reference": reference},
        "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": _OBJECT_ROLE, "code": role, "display": display},
    }


def escalation_audit_event(
    communication: dict[str, Any], task: dict[str, Any], timeout: float, now: datetime
) -> dict[str, Any]:
    """The AuditEvent of one escalation (pure)."""
    entities = [
        _entity(f"Communication/{communication['id']}", "4", "Domain Resource"),
        _entity(f"Task/{task['id']}", "4", "Domain Resource"),
    ]
    entities += [_entity(a["reference"], "3", "Report") for a in communication.get("about", [])]
    subject = (communication.get("subject") or {}).get("reference")
    if subject:
        entities.append(
            {
                "what": {"reference": subject},
                "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": dict(_PATIENT_RECORD),
        "subtype": [dict(_SUBTYPE)],
        "action": "C",
        "recorded": _instant(now),
        "outcome": "0",
        "outcomeDesc": (
            f"Critical result not acknowledged within {timeout:g} s: escalated to Task/{task['id']}"
        ),
        "agent": [
            {"type": {"coding": [dict(_APPLICATION)]}, "who": {"display": SERVER_AGENT}, "requestor": True}
        ],
        "source": {"observer": {"display": SERVER_AGENT}},
        "entity": entities,
    }
    return with_narrative(event, audit_event_narrative(event))


class CriticalEscalation:
    """The acknowledgement consumer and the escalation check (pipelined providers)."""

    def __init__(
        self,
        providers: dict[str, ResourceProvider],
        recorder: AuditRecorder | None,
        *,
        timeout: float,
        interval: float,
        base_url: str,
    ) -> None:
        self._communications = providers["Communication"]
        self._tasks = providers["Task"]
        self._recorder = recorder
        self._timeout = timeout
        self._interval = interval
        self._base_url = base_url
        self._loop: asyncio.Task[None] | None = None
        self._watermark: str | None = None

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(ResourceChanged, self.on_reply, in_transaction=True)

    async def on_reply(self, event: ResourceChanged) -> None:
        """A Communication in response to a critical one completes it (the acknowledgement)."""
        if event.resource_type != "Communication" or event.after is None:
            return
        for item in event.after.get("inResponseTo", []):
            target = local_target(str(item.get("reference", "")))
            if target is None or target[0] != "Communication":
                continue
            with on_server_authority(), origin_scope(Origin.INTERNAL):
                original = await read_or_none(self._communications, target[1])
                if original is None or original.get("status") != "in-progress" or not _is_critical(original):
                    continue
                original["status"] = "completed"
                original["received"] = event.after.get("sent") or _instant(datetime.now(UTC))
                await self._communications.update(original["id"], original, if_match=None)
                log.info("Critical result Communication/%s acknowledged by a reply", original["id"])

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="critical-result-escalation")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # one failed check must not end the checks: logged, retried
                log.exception("Critical result escalation check failed")
            await asyncio.sleep(self._interval)

    async def check(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Escalate what is overdue; returns the Tasks written.

        The overdue ones are read oldest `sent` first, a page at a time, from a watermark: the `sent`
        of the last one looked at. Escalated Communications stay `in-progress` (the recipient may
        still acknowledge), so without the watermark they would fill every page and starve newer
        ones. The watermark lives in memory: after a restart the first check reads them all once;
        a Communication already escalated is recognised by its follow-up Task and skipped.
        """
        now = now or datetime.now(UTC)
        cutoff = now - timedelta(seconds=self._timeout)
        written = []
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            while True:
                page = await self._overdue_page(cutoff)
                for communication in page:
                    task = await self._escalate(communication)
                    if task is not None:
                        written.append(task)
                        await self._record(communication, task, now)
                last = str(page[-1].get("sent", "")) if page else None
                if len(page) < _BATCH or last is None or last == self._watermark:
                    break  # the last page (or a page of one instant: the next check goes on)
                self._watermark = last
            if page and page[-1].get("sent"):
                self._watermark = str(page[-1]["sent"])
        return written

    async def _overdue_page(self, cutoff: datetime) -> list[dict[str, Any]]:
        search = (
            SearchBuilder(self._communications, base_url=self._base_url)
            .where_token("category", CRITICAL_CATEGORY["system"], CRITICAL_CATEGORY["code"])
            .where("status", "in-progress")
            .where("sent", f"lt{_instant(cutoff)}")
        )
        if self._watermark is not None:  # ge: several may share the last instant; Tasks are unique
            search = search.where("sent", f"ge{self._watermark}")
        return await search.sort("sent").count(_BATCH).matches()

    async def _record(self, communication: dict[str, Any], task: dict[str, Any], now: datetime) -> None:
        if self._recorder is not None:
            await self._recorder.record(escalation_audit_event(communication, task, self._timeout, now))
        log.warning(
            "Critical result Communication/%s not acknowledged: escalated to Task/%s",
            communication["id"],
            task["id"],
        )

    async def _escalate(self, communication: dict[str, Any]) -> dict[str, Any] | None:
        focus = f"Communication/{communication['id']}"
        search = (
            SearchBuilder(self._tasks, base_url=self._base_url)
            .where("focus", focus)
            .where_token("code", FOLLOW_UP_CODE["system"], FOLLOW_UP_CODE["code"])
        )
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "priority": "stat",
            "code": {"coding": [dict(FOLLOW_UP_CODE)]},
            "focus": {"reference": focus},
            "authoredOn": _instant(datetime.now(UTC)),
            "description": "Critical result not acknowledged by the ordering practitioner: call them.",
        }
        if communication.get("subject"):
            task["for"] = communication["subject"]
        if communication.get("basedOn"):
            task["basedOn"] = communication["basedOn"]
        task["input"] = [
            {"type": {"text": "Critical result report"}, "valueReference": about}
            for about in communication.get("about", [])
        ]
        if not task["input"]:
            del task["input"]

        async def attempt(guard: ConditionalGuard) -> dict[str, Any] | None:
            with guard.searching():
                if await search.matches():
                    return None
            with guard.writing():
                return await self._tasks.create(task)

        return await guarded("Task", search.params, attempt)


def _is_critical(communication: dict[str, Any]) -> bool:
    return any(
        c.get("system") == CRITICAL_CATEGORY["system"] and c.get("code") == CRITICAL_CATEGORY["code"]
        for concept in communication.get("category", [])
        for c in concept.get("coding", [])
    )
