"""The audit's pipeline stage: an AuditEvent for each interaction that no request record covers.

The ASGI middleware records one AuditEvent per HTTP request (it alone sees refusals before any
provider, DICOMweb and the authorization server). What a request or the server does beyond that
request's own interaction is recorded here, from the pipeline's `InteractionContext`, one event per
interaction (IHE BALP: each FHIR interaction of a transaction is audited on its own):

- every entry of a batch or transaction Bundle (origin BUNDLE_ENTRY);
- every write an operation or the server makes, for a client or on its own (origins OPERATION and
  INTERNAL: the `$analyze` result, arrival and scheduling Tasks). Their reads are part of the
  request or job that made them and are not recorded one by one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_facade.audit.event import audit_event
from fhir_facade.audit.interaction import FHIR_PREFIX, REST_EVENT, Interaction
from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.auth.access import Access
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline import Call, InteractionContext, InteractionKind, Origin, Proceed
from fhir_facade.fhir.provider import WriteResult

__all__ = ["AuditStage"]

#: kind -> (HTTP method of the equivalent REST call, AuditEvent.action, restful-interaction subtype)
_KINDS: dict[InteractionKind, tuple[str, str, str]] = {
    InteractionKind.READ: ("GET", "R", "read"),
    InteractionKind.VREAD: ("GET", "R", "vread"),
    InteractionKind.SEARCH: ("GET", "R", "search-type"),
    InteractionKind.HISTORY: ("GET", "R", "history-instance"),
    InteractionKind.CREATE: ("POST", "C", "create"),
    InteractionKind.UPDATE: ("PUT", "U", "update"),
    InteractionKind.DELETE: ("DELETE", "D", "delete"),
}


class AuditStage:
    """Records the interactions described above; the recorder stores them off the request path."""

    def __init__(
        self, recorder: AuditRecorder, *, site: str, base_url: str, subject_system: str | None
    ) -> None:
        self._recorder = recorder
        self._site = site
        self._base_url = base_url
        self._subject_system = subject_system

    @staticmethod
    def audits(context: InteractionContext) -> bool:
        if context.origin is Origin.BUNDLE_ENTRY:
            return True
        return context.origin in (Origin.OPERATION, Origin.INTERNAL) and context.kind.writes

    async def around(self, context: InteractionContext, call: Call, proceed: Proceed) -> Any:
        if not self.audits(context):
            return await proceed()
        started = datetime.now(UTC)
        try:
            result = await proceed()
        except FhirError as error:
            await self._record(context, error.status, None, started)
            raise
        status, created = _status_of(context.kind, result)
        await self._record(context, status, created, started)
        return result

    async def _record(
        self, context: InteractionContext, status: int, created: str | None, started: datetime
    ) -> None:
        method, action, subtype = _KINDS[context.kind]
        if context.kind is InteractionKind.HISTORY and context.resource_id is None:
            subtype = "history-type"
        target = context.reference if context.resource_id else None
        interaction = Interaction(
            method,
            f"{FHIR_PREFIX}/{context.reference}",
            REST_EVENT,
            action,
            subtype,
            context.resource_type,
            targets=(target,) if target else (),
            patients=(str(context.resource_id),) if target and context.resource_type == "Patient" else (),
        )
        caller = context.caller if isinstance(context.caller, Access) else None
        event = audit_event(
            interaction,
            status=status,
            access=caller,
            client_address=None,
            correlation_id=context.correlation_id,
            site=self._site,
            started=started,
            ended=datetime.now(UTC),
            created=created,
            subject_system=self._subject_system,
            base_url=self._base_url,
            origin=context.origin.value,
        )
        await self._recorder.record(event, context.correlation_id)


def _status_of(kind: InteractionKind, result: Any) -> tuple[int, str | None]:
    """The HTTP status the interaction would have answered over REST, and `Type/id` of a creation."""
    if kind is InteractionKind.CREATE and isinstance(result, dict):
        return 201, f"{result.get('resourceType')}/{result.get('id')}"
    if kind is InteractionKind.UPDATE and isinstance(result, WriteResult):
        resource = result.resource
        created = f"{resource.get('resourceType')}/{resource.get('id')}" if result.created else None
        return (201 if result.created else 200), created
    if kind is InteractionKind.DELETE:
        return 204, None
    return 200, None
