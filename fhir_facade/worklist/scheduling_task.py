"""An imaging order the facade cannot put on the worklist -> a Task for a person to schedule it.

When neither a DCM modality coding nor the procedure catalogue gives an order's modality, the order
is still stored (it is a valid order; the catalogue lacks its code) and this Task (R4 task.html:
status requested, intent order, focus the ServiceRequest, for its patient) asks someone to schedule
it by hand or to add the code to the site's catalogue. Pure: the order in, the Task out.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fhir_facade.fhir.narrative import Facts, Paragraph, narrative, reference_text, with_narrative

__all__ = ["SCHEDULE_CODE", "TASK_CODE_SYSTEM", "scheduling_task", "scheduling_task_narrative"]

#: The facade's own Task codes (capability/CodeSystem-task-code.json).
TASK_CODE_SYSTEM = "http://fhir-facade.org/fhir/CodeSystem/task-code"
SCHEDULE_CODE = {"system": TASK_CODE_SYSTEM, "code": "schedule", "display": "Schedule imaging order"}

# R4 request-priority codes (valueset-request-priority.html), shared by ServiceRequest and Task.
_PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})


def _code_text(order: Mapping[str, Any]) -> str:
    code = order.get("code") or {}
    parts = [
        f"{c.get('system', '?')}|{c.get('code', '?')}" + (f" ({c['display']})" if c.get("display") else "")
        for c in code.get("coding", [])
    ]
    if code.get("text"):
        parts.append(repr(str(code["text"])))
    return ", ".join(parts) or "no code"


def scheduling_task(order: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The Task asking a person to schedule `order` (a stored ServiceRequest, with its id)."""
    reference = f"ServiceRequest/{order['id']}"
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [dict(SCHEDULE_CODE)]},
        "description": (
            f"Schedule imaging order {reference} by hand: its DICOM modality could not be derived from "
            f"its code ({_code_text(order)}), so no worklist item was written. Add the code to the "
            "site's procedure catalogue (FACADE_WORKLIST_PROCEDURE_MAP) or give the order a DCM "
            "modality coding."
        ),
        "focus": {"reference": reference},
        "authoredOn": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    subject = order.get("subject") or {}
    if isinstance(subject.get("reference"), str) and subject["reference"].startswith("Patient/"):
        task["for"] = {"reference": subject["reference"]}
    if order.get("priority") in _PRIORITIES:
        task["priority"] = order["priority"]
    return with_narrative(task, scheduling_task_narrative(task, order))


def scheduling_task_narrative(task: Mapping[str, Any], order: Mapping[str, Any]) -> dict[str, str]:
    """What the person is asked to do, for which order and patient (R4 narrative.html)."""
    reference = task["focus"]["reference"]
    patient = reference_text(order.get("subject"))
    return narrative(
        Paragraph(
            f"Schedule imaging order {reference}"
            + (f" for patient {patient}" if patient else "")
            + " by hand: its DICOM modality could not be derived from its code, so it is not on "
            "the modality worklist."
        ),
        Paragraph(
            "Then add the code to the site's procedure catalogue (FACADE_WORKLIST_PROCEDURE_MAP) "
            "or give the order a DCM modality coding, so later orders reach the worklist."
        ),
        Facts(
            [
                ("Status", task.get("status")),
                ("Priority", task.get("priority")),
                ("Order", reference),
                ("Procedure", _code_text(order)),
                ("Patient", patient),
                ("Authored", task.get("authoredOn")),
            ]
        ),
    )
