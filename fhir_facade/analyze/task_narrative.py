"""The narrative of an analysis Task (code `analyze`): what to do, for which study and patient, and
where it stands (R4 task.html; narrative.html).

One function for every analysis Task the facade writes or moves on: the arrival Task of a new study
(fhir_facade.watcher.arrival_tasks), the Task of a `$analyze` request, and each state change the
worker makes (in-progress, completed, failed, cancelled). Written from the Task's own elements, so
the text always says what the structured content says. A client's own narrative on a Task it
requested is kept (`with_narrative`; ADR 0019).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_facade.fhir.narrative import Facts, Paragraph, joined, narrative, reference_text, with_narrative

__all__ = ["analysis_task_narrative", "with_analysis_task_narrative"]


def _input(task: Mapping[str, Any], name: str) -> str | None:
    for item in task.get("input", []):
        if item.get("type", {}).get("text") == name and isinstance(item.get("valueString"), str):
            return str(item["valueString"])
    return None


def _report(task: Mapping[str, Any]) -> str | None:
    return joined(reference_text(o.get("valueReference")) for o in task.get("output", []))


def _state(task: Mapping[str, Any]) -> str:
    status = task.get("status")
    reason = task.get("statusReason", {}).get("text")
    if status == "requested":
        return "Requested: waiting for the analysis worker to take it."
    if status == "in-progress":
        return "In progress: the AI model is running on the study's images."
    if status == "completed":
        report = _report(task) or "the report"
        return f"Completed: the preliminary AI report is {report}; a radiologist must review it."
    if status in ("failed", "cancelled", "rejected"):
        return f"{str(status).capitalize()}" + (f": {reason}" if reason else ".")
    return f"Status: {status}."


def analysis_task_narrative(task: Mapping[str, Any]) -> dict[str, str]:
    """What the analysis Task asks for and where it stands."""
    study = reference_text(task.get("focus")) or "the focus study"
    patient = reference_text(task.get("for"))
    model = _input(task, "model")
    orders = joined(reference_text(ref) for ref in task.get("basedOn", []))
    what = (
        f"Analyze imaging study {study}"
        + (f" of patient {patient}" if patient else "")
        + (f" with the AI model {model}" if model else " with the default AI model")
        + (f", for order {orders}" if orders else "")
        + "."
    )
    return narrative(
        Paragraph(what),
        Paragraph(_state(task)),
        Facts(
            [
                ("Status", task.get("status")),
                ("Priority", task.get("priority")),
                ("Imaging study", study),
                ("Series", _input(task, "series")),
                ("Patient", patient),
                ("Order", orders),
                ("Report", _report(task)),
                ("Authored", task.get("authoredOn")),
            ]
        ),
    )


def with_analysis_task_narrative(task: Mapping[str, Any]) -> dict[str, Any]:
    """`task` with its narrative (re)generated, unless it carries a narrative the facade did not
    write."""
    return with_narrative(task, analysis_task_narrative(task))
