"""The scheduling Task of an order without a derivable modality (worklist/scheduling_task.py):
pure, so hostile order values are tried here."""

from __future__ import annotations

from datetime import UTC, datetime

from fhir_facade.worklist.scheduling_task import scheduling_task
from tests.conftest import validate
from tests.narrative_checks import narrative_text

HOSTILE = "<script>alert(1)</script> & Co"


def test_the_narrative_says_what_to_do_for_which_order_and_patient_escaped() -> None:
    order = {
        "resourceType": "ServiceRequest",
        "id": "o-7",
        "status": "active",
        "intent": "order",
        "priority": "urgent",
        "code": {"coding": [{"system": "http://local.example", "code": "X&Y"}], "text": HOSTILE},
        "subject": {"reference": "Patient/P-7", "display": HOSTILE},
    }
    task = scheduling_task(order, datetime(2026, 12, 7, 8, 0, tzinfo=UTC))
    validate(task)
    assert list(task)[:2] == ["resourceType", "text"]
    assert "<script" not in task["text"]["div"]
    narrative_text(
        task,
        f"Schedule imaging order ServiceRequest/o-7 for patient {HOSTILE} (Patient/P-7) by hand",
        "procedure catalogue",
        "Priority urgent",
        "http://local.example|X&Y",
    )
