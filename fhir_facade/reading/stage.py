"""The reading workflow's rules on writes (ADR 0033), as a pipeline stage (ADR 0022) after the
authorization: they apply to REST, Bundle entries and every other entry point alike.

Reading Tasks (code `read`):
- a Task `accepted` or `in-progress` has an owner: the client's, or else the caller's `fhirUser`
  (SMART App Launch 2.0 "fhirUser" claim); none at all is 422;
- a Task owned by one practitioner is not taken by another (409 `reading_task_claimed`), even
  with the right ETag: the owner hands it over (their token's fhirUser is the owner) or it is
  released first (owner removed, status `requested`). The ETag is looked at first: a stale
  If-Match is the store's 412, as for any update (R4 http.html#concurrency).

The radiologist's DiagnosticReport: a report of an imaging study (`imagingStudy` set) written by
a client (not the AI's: `$analyze` writes with origin OPERATION or INTERNAL):
- `resultsInterpreter` from the caller's fhirUser when the client gave none; a signed report
  (final, amended, corrected, appended) without one is 422;
- a signed report does not go back to registered/preliminary (422), and a change to `amended` or
  `corrected` brings a new reason (the R5 `DiagnosticReport.note` cross-version extension);
- without a client PDF in `presentedForm`, the facade adds one (fhir_facade.reading.pdf) beside
  the other forms (an AI report's SR link stays), and re-renders its own on every change.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

from fhir_facade.fhir.errors import error, unprocessable
from fhir_facade.fhir.pipeline import Call, Create, InteractionContext, Origin, Proceed, Update
from fhir_facade.reading.codes import AMENDMENT_REASON_EXTENSION, READ_CODE
from fhir_facade.reading.pdf import render_report_pdf
from fhir_facade.store.etags import parse_etag

__all__ = ["RENDERED_TITLE", "ReadingStage"]

SIGNED = ("final", "amended", "corrected", "appended")
_CLAIMED = ("accepted", "in-progress")
#: presentedForm.title of the PDF the facade made (so it knows to re-render it).
RENDERED_TITLE = "Report rendered by fhir-facade"
_PERSON_TYPES = ("Practitioner/", "PractitionerRole/")


def _fhir_user(context: InteractionContext) -> str | None:
    user = getattr(context.caller, "fhir_user", None)
    return user if isinstance(user, str) and user.startswith(_PERSON_TYPES) else None


def _is_read_task(resource: dict[str, Any] | None) -> bool:
    codings = ((resource or {}).get("code") or {}).get("coding", [])
    return any(c.get("system") == READ_CODE["system"] and c.get("code") == READ_CODE["code"] for c in codings)


def _owner(resource: dict[str, Any] | None) -> str | None:
    owner = (resource or {}).get("owner") or {}
    reference = owner.get("reference")
    return reference if isinstance(reference, str) else None


def _reasons(report: dict[str, Any] | None) -> list[str]:
    return [
        str((e.get("valueAnnotation") or {}).get("text", ""))
        for e in (report or {}).get("extension", [])
        if e.get("url") == AMENDMENT_REASON_EXTENSION
    ]


class ReadingStage:
    """A pipeline stage; put it after the authorization stage."""

    async def around(self, context: InteractionContext, call: Call, proceed: Proceed) -> Any:
        if isinstance(call, Update) and context.resource_type == "Task":
            await self._claim(context, call)
        elif (
            isinstance(call, Create | Update)
            and context.resource_type == "DiagnosticReport"
            and context.origin not in (Origin.OPERATION, Origin.INTERNAL)
            and call.resource.get("imagingStudy")
        ):
            await self._report(context, call)
        return await proceed()

    async def _claim(self, context: InteractionContext, call: Update) -> None:
        task = call.resource
        if not _is_read_task(task):
            return
        if task.get("status") in _CLAIMED and _owner(task) is None:
            user = _fhir_user(context)
            if user is None:
                raise unprocessable(
                    "A reading Task accepted or in progress names its owner (Task.owner); the token "
                    "has no fhirUser to take it from",
                    detail_code="reading_task_owner_missing",
                    code="required",
                )
            task["owner"] = {"reference": user}
        current = await call.current()
        if current is None or not _is_read_task(current):
            return
        if call.if_match is not None and parse_etag(call.if_match) != int(current["meta"]["versionId"]):
            return  # the store answers 412: the claim was made on a version that is gone
        holder, wanted = _owner(current), _owner(task)
        if holder is None or wanted is None or wanted == holder:
            return  # unclaimed, a release, or the owner's own change
        if _fhir_user(context) == holder:
            return  # the owner hands the Task over
        raise error(
            409,
            "conflict",
            f"Task/{call.id} is claimed by {holder}; it is released first (owner removed, status "
            "requested) or handed over by its owner (ADR 0033)",
            detail_code="reading_task_claimed",
            expression=("Task.owner",),
        )

    async def _report(self, context: InteractionContext, call: Create | Update) -> None:
        report = call.resource
        user = _fhir_user(context)
        if not report.get("resultsInterpreter") and user is not None:
            report["resultsInterpreter"] = [{"reference": user}]
        status = report.get("status")
        if status in SIGNED and not report.get("resultsInterpreter"):
            raise unprocessable(
                f"A {status} DiagnosticReport names who signed it (resultsInterpreter); the token has "
                "no fhirUser to take it from",
                detail_code="report_interpreter_missing",
                code="required",
            )
        before = await call.current() if isinstance(call, Update) else None
        before_status = (before or {}).get("status")
        if before_status in SIGNED and status in ("registered", "preliminary"):
            raise unprocessable(
                f"DiagnosticReport/{call.id} is signed ({before_status}); it is amended or corrected, "
                "not made preliminary again",
                detail_code="report_unsigned_again",
                code="business-rule",
            )
        amended = before_status in SIGNED and status in ("amended", "corrected")
        if amended and len(_reasons(report)) <= len(_reasons(before)):
            raise unprocessable(
                f"A DiagnosticReport changed to {status} gives its reason: a new extension "
                f"{AMENDMENT_REASON_EXTENSION} (valueAnnotation.text)",
                detail_code="report_amendment_reason_missing",
                code="required",
            )
        forms = [f for f in report.get("presentedForm", []) if f.get("title") != RENDERED_TITLE]
        if any(f.get("contentType") == "application/pdf" for f in forms):
            return  # the client's own PDF
        report["presentedForm"] = [*forms, await _rendered(report)]  # others (the AI's SR link) kept


async def _rendered(report: dict[str, Any]) -> dict[str, Any]:
    patient = (report.get("subject") or {}).get("display") or (report.get("subject") or {}).get("reference")
    studies = [str(s.get("reference", "")) for s in report.get("imagingStudy", [])]
    data = await asyncio.to_thread(
        render_report_pdf, report, patient=patient, study=", ".join(studies) or None
    )
    return {
        "contentType": "application/pdf",
        "data": base64.b64encode(data).decode("ascii"),
        "title": RENDERED_TITLE,
        "creation": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
