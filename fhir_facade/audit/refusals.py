"""Refused authentications at the built-in authorization server -> AuditEvents in the store.

The authorization server (`auth.server.failure_report`) knows only the `RefusalAudit` protocol; this
is its implementation, built by the application with the one `AuditRecorder`, so `auth` does not
import `audit` (ADR 0025).
"""

from __future__ import annotations

from typing import Literal

from fhir_facade.audit.authentication import authentication_event
from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.correlation import current_correlation_id

__all__ = ["AuthenticationAudit"]


class AuthenticationAudit:
    """Records each refused sign-in or token request (DICOM PS3.15 A.5.3.1, IHE BALP)."""

    def __init__(self, recorder: AuditRecorder, *, site: str, issuer: str) -> None:
        self._recorder = recorder
        self._site = site
        self._issuer = issuer

    async def refused(
        self,
        endpoint: Literal["sign-in", "token"],
        *,
        description: str,
        username: str | None,
        client_id: str | None,
        client_address: str | None,
    ) -> None:
        """Build the AuditEvent (`authentication_event`) and record it."""
        event = authentication_event(
            endpoint,
            description=description,
            username=username,
            client_id=client_id,
            client_address=client_address,
            correlation_id=current_correlation_id(),
            site=self._site,
            issuer=self._issuer,
        )
        await self._recorder.record(event, current_correlation_id())
