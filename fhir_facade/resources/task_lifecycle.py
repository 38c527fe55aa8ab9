"""The R4 Task state machine (FHIR task.html#statemachine) and the bookkeeping Task needs on every
write: allowed status transitions, `lastModified`, and invariant inv-1
(lastModified >= authoredOn)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_facade.fhir.errors import bad_request, conflict

__all__ = ["ALLOWED_TRANSITIONS", "check_transition", "stamp_task"]

_END = frozenset({"entered-in-error"})
#: status -> statuses it may move to. Terminal states (completed, failed, rejected, cancelled)
#: may only be corrected to entered-in-error. requested -> in-progress is allowed so that an
#: automated performer (the $analyze worker) can take a Task without intermediate steps.
#: received/accepted/ready/in-progress/on-hold -> requested is a *release*: the performer gives the
#: Task back to the pool unfinished (owner removed), as a reading worklist needs (ADR 0033).
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"requested", "cancelled"}) | _END,
    "requested": frozenset({"received", "accepted", "rejected", "ready", "in-progress", "cancelled"}) | _END,
    "received": frozenset({"requested", "accepted", "rejected", "ready", "in-progress", "cancelled"}) | _END,
    "accepted": frozenset({"requested", "ready", "in-progress", "cancelled"}) | _END,
    "ready": frozenset({"requested", "in-progress", "cancelled"}) | _END,
    "in-progress": frozenset({"requested", "on-hold", "completed", "failed", "cancelled"}) | _END,
    "on-hold": frozenset({"requested", "in-progress", "failed", "cancelled"}) | _END,
    "completed": _END,
    "failed": _END,
    "rejected": _END,
    "cancelled": _END,
    "entered-in-error": frozenset(),
}


def check_transition(old_status: str, new_status: str) -> None:
    """Raise 409 unless the state machine allows `old_status` -> `new_status` (same = allowed)."""
    if old_status == new_status:
        return
    if new_status not in ALLOWED_TRANSITIONS.get(old_status, frozenset()):
        allowed = ", ".join(sorted(ALLOWED_TRANSITIONS.get(old_status, frozenset()))) or "none"
        raise conflict(
            f"Task status cannot change from '{old_status}' to '{new_status}' (allowed: {allowed})",
            expression="Task.status",
        )


def _parse(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stamp_task(task: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Set lastModified to `now` (and authoredOn when absent) and enforce inv-1."""
    stamped = dict(task)
    stamp = now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    stamped.setdefault("authoredOn", stamp)
    stamped["lastModified"] = stamp
    try:
        authored = _parse(stamped["authoredOn"])
    except ValueError as exc:
        raise bad_request("Task.authoredOn is not a valid dateTime", expression="Task.authoredOn") from exc
    if authored.tzinfo and authored > now:
        raise bad_request(
            "inv-1: Task.lastModified must be at or after authoredOn, and authoredOn lies in the future",
            expression="Task.authoredOn",
        )
    return stamped
