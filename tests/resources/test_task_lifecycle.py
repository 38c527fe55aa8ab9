"""The R4 Task state machine and inv-1, as pure rules."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fhir_facade.fhir.errors import FhirError
from fhir_facade.resources.task_lifecycle import ALLOWED_TRANSITIONS, check_transition, stamp_task

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("requested", "in-progress"),
        ("in-progress", "completed"),
        ("in-progress", "failed"),
        ("draft", "requested"),
        ("on-hold", "in-progress"),
        ("completed", "entered-in-error"),
        ("completed", "completed"),
        ("in-progress", "requested"),  # a release (ADR 0033)
        ("accepted", "requested"),
    ],
)
def test_allowed(old: str, new: str) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("completed", "requested"),
        ("completed", "in-progress"),
        ("failed", "in-progress"),
        ("cancelled", "requested"),
        ("entered-in-error", "requested"),
        ("in-progress", "draft"),
    ],
)
def test_forbidden_is_409(old: str, new: str) -> None:
    with pytest.raises(FhirError) as info:
        check_transition(old, new)
    assert info.value.status == 409 and info.value.issues[0].expression == ("Task.status",)


def test_every_r4_status_is_covered() -> None:
    r4 = {
        "draft",
        "requested",
        "received",
        "accepted",
        "rejected",
        "ready",
        "cancelled",
        "in-progress",
        "on-hold",
        "failed",
        "completed",
        "entered-in-error",
    }
    assert set(ALLOWED_TRANSITIONS) == r4
    assert all(targets <= r4 for targets in ALLOWED_TRANSITIONS.values())


def test_stamp_sets_last_modified_and_keeps_inv1() -> None:
    task = stamp_task({"resourceType": "Task", "authoredOn": "2026-11-24T11:00:00Z"}, NOW)
    assert task["lastModified"] == "2026-11-24T12:00:00.000Z"
    assert stamp_task({"resourceType": "Task"}, NOW)["authoredOn"] == task["lastModified"]
    with pytest.raises(FhirError):
        stamp_task({"resourceType": "Task", "authoredOn": "2027-01-01T00:00:00Z"}, NOW)
