"""`AuditMiddleware`: one AuditEvent per audited request, whatever its outcome.

A pure ASGI middleware, so it sees what no handler does: the status of every answer, including
the 401 and 403 refusals of the authenticating dependency and the 404/405 of the router, and the
request's Location (the id a create assigned). The caller comes from `scope["state"]["access"]`,
where the authenticating dependency leaves it; the correlation id from
`scope["state"]["correlation_id"]` (fhir_facade.correlation). The event is built after the answer
is sent and handed to the `AuditRecorder`, so storing it never delays the response.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_facade.audit.event import audit_event
from fhir_facade.audit.interaction import describe_interaction, is_audited, needs_body
from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.audit.stage import AuditStage
from fhir_facade.auth.access import Access
from fhir_facade.config import Settings
from fhir_facade.correlation import current_correlation_id
from fhir_facade.store import ResourceStore

__all__ = ["AuditMiddleware", "audit_recorder", "audit_stage", "install_audit"]

log = logging.getLogger(__name__)

#: Request bodies read for the audit (a Bundle's type, a POSTed search's parameters) are
#: observed as they pass, up to this size; the application still reads them whole.
_BODY_LIMIT = 16 * 1024 * 1024


class AuditMiddleware:
    """Audit every request `is_audited` selects (see fhir_facade.audit.interaction).

    `auth_none`: FACADE_AUTH=none, where a request without an Access is unauthenticated by
    configuration rather than refused. `site`, `subject_system` and `base_url` go into the event
    (see `audit_event`)."""

    def __init__(
        self,
        app: ASGIApp,
        recorder: AuditRecorder,
        *,
        site: str,
        base_url: str,
        auth_none: bool,
        subject_system: str | None = None,
    ) -> None:
        self.app = app
        self._recorder = recorder
        self._site = site
        self._base_url = base_url
        self._auth_none = auth_none
        self._subject_system = subject_system

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        # OPTIONS is a CORS preflight, not an interaction with data.
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_audited(path):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})  # shared with the app's Request.state
        started = datetime.now(UTC)
        method: str = scope["method"]
        capture = needs_body(method, path)
        body = bytearray()
        answer: dict[str, Any] = {"status": None, "location": None}

        async def observed_receive() -> Message:
            message = await receive()
            if capture and message["type"] == "http.request" and len(body) < _BODY_LIMIT:
                body.extend(message.get("body", b""))
            return message

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"location":
                        answer["location"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, observed_receive, observed_send)
        except Exception:
            # ServerErrorMiddleware (outside us) answers 500 and logs the error.
            answer["status"] = answer["status"] or 500
            await self._record(scope, state, started, answer, bytes(body) if capture else None)
            raise
        except BaseException:  # cancelled (client gone, shutdown): no awaiting now
            event, correlation = self._event(scope, state, started, answer, bytes(body) if capture else None)
            self._recorder.record_nowait(event, correlation)
            raise
        await self._record(scope, state, started, answer, bytes(body) if capture else None)

    async def _record(
        self,
        scope: Scope,
        state: dict[str, Any],
        started: datetime,
        answer: dict[str, Any],
        body: bytes | None,
    ) -> None:
        try:
            event, correlation = self._event(scope, state, started, answer, body)
        except Exception:  # never let the audit break a request that has been answered
            log.exception("Could not build the AuditEvent of %s %s", scope["method"], scope.get("path"))
            return
        await self._recorder.record(event, correlation)

    def _event(
        self,
        scope: Scope,
        state: dict[str, Any],
        started: datetime,
        answer: dict[str, Any],
        body: bytes | None,
    ) -> tuple[dict[str, Any], str | None]:
        interaction = describe_interaction(
            scope["method"], scope.get("path", ""), scope.get("query_string", b"").decode("latin-1"), body
        )
        access = state.get("access")
        if not isinstance(access, Access):
            access = Access.unrestricted() if self._auth_none else None
        client = scope.get("client")
        correlation = state.get("correlation_id") or current_correlation_id()
        event = audit_event(
            interaction,
            status=answer["status"],
            access=access,
            client_address=client[0] if client else None,
            correlation_id=correlation,
            site=self._site,
            started=started,
            ended=datetime.now(UTC),
            created=self._created(answer["location"], answer["status"]),
            subject_system=self._subject_system,
            base_url=self._base_url,
        )
        return event, correlation

    def _created(self, location: str | None, status: int | None) -> str | None:
        """`Type/id` from the Location of a 201 (`[base]/Type/id/_history/n`, http.html#create)."""
        if status != 201 or not location:
            return None
        relative = location.removeprefix(self._base_url.rstrip("/") + "/").split("/_history/", 1)[0]
        parts = relative.split("/")
        return relative if len(parts) == 2 and all(parts) else None


def install_audit(app: FastAPI, settings: Settings, recorder: AuditRecorder | None) -> AuditRecorder | None:
    """When auditing is on (`recorder` given, see `audit_recorder`): add `AuditMiddleware` to `app` and
    return the recorder, for the lifespan to `await recorder.start()` (after the store schema is
    upgraded) and `await recorder.stop()` (before the engine is disposed: it flushes the queue).
    The recorder is also `app.state.audit`."""
    if recorder is None:
        return None
    existing = getattr(app.state, "audit", None)
    if isinstance(existing, AuditRecorder):
        return existing
    app.add_middleware(
        AuditMiddleware,
        recorder=recorder,
        site=settings.public_root,
        base_url=settings.base_url,
        auth_none=settings.auth == "none",
        subject_system=settings.token_issuer if settings.auth == "smart" else None,
    )
    app.state.audit = recorder
    return recorder


def audit_recorder(settings: Settings, store: ResourceStore) -> AuditRecorder | None:
    """The recorder of this server's AuditEvents (the middleware's and the audit stage's), or None
    when `settings.audits` is off."""
    return AuditRecorder(store) if settings.audits else None


def audit_stage(settings: Settings, recorder: AuditRecorder) -> AuditStage:
    """The pipeline stage recording what no request record covers (audit/stage.py)."""
    return AuditStage(
        recorder,
        site=settings.public_root,
        base_url=settings.base_url,
        subject_system=settings.token_issuer if settings.auth == "smart" else None,
    )
