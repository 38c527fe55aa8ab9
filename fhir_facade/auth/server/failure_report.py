"""Log lines and AuditEvents for refused authentications at the built-in authorization server.

Every failed sign-in or client authentication, every lockout it starts and every attempt refused
during a lockout is logged (WARNING; refusals during a lockout at INFO, they can be many) with the
username or client_id and the client address, never the password or credential, and recorded as a
security AuditEvent when auditing is on: the application hands in a `RefusalAudit`
(`fhir_facade.audit.authentication.AuthenticationAudit`), so this package does not import the
audit package, which depends on it (ADR 0025).
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

from fhir_facade.auth.server.lockout import Attempt

__all__ = ["FailureReporter", "RefusalAudit"]

log = logging.getLogger(__name__)

#: Names in log lines and audit records are cut here (a form field can hold anything).
_NAME_LIMIT = 200


def _shown(value: str) -> str:
    printable = "".join(c if c.isprintable() else "?" for c in value[:_NAME_LIMIT])
    return printable + ("..." if len(value) > _NAME_LIMIT else "")


def _what(endpoint: Literal["sign-in", "token"]) -> tuple[str, str]:
    return ("sign-in", "user") if endpoint == "sign-in" else ("token request", "client")


class RefusalAudit(Protocol):
    """Records one refused authentication as an AuditEvent (DICOM PS3.15 A.5, IHE BALP)."""

    async def refused(
        self,
        endpoint: Literal["sign-in", "token"],
        *,
        description: str,
        username: str | None,
        client_id: str | None,
        client_address: str | None,
    ) -> None: ...


class FailureReporter:
    """Logs and audits the refused attempts of one authorization server."""

    def __init__(self, audit: RefusalAudit | None) -> None:
        self._audit = audit

    async def report(
        self,
        endpoint: Literal["sign-in", "token"],
        attempt: Attempt,
        *,
        client_id: str | None,
        reason: str,
    ) -> None:
        """Log and audit ``attempt`` if it was refused or failed (successes are not recorded here).
        ``reason`` says why it failed (never a credential); ``client_id`` is the app at sign-in."""
        if attempt.outcome not in ("refused", "failed"):
            return
        action, kind = _what(endpoint)
        principal = _shown(attempt.principal)
        address = _shown(attempt.address)
        if attempt.outcome == "refused":
            by = " and ".join(attempt.refused_by)
            description = (
                f"{action} refused without checking credentials: {kind} {principal!r} from {address} "
                f"is locked out ({by}); retry after {attempt.retry_after} s"
            )
            log.info("%s", description)
        else:
            description = f"{action} failed for {kind} {principal!r} from {address}: {reason}"
            for locked in attempt.locked:
                subject = f"{kind} {principal!r}" if locked.kind != "address" else f"address {address}"
                lock = (
                    f"{subject} locked out for {round(locked.seconds)} s after "
                    f"{locked.failures} failed attempts"
                )
                description += f"; {lock}"
                log.warning("Lockout at the %s endpoint: %s", endpoint, lock)
            own, shared = attempt.failures
            log.warning(
                "%s (failures in the window: %d for this %s, %d from this address)",
                description,
                own,
                kind,
                shared,
            )
        if self._audit is None:
            return
        try:
            await self._audit.refused(
                endpoint,
                description=description,
                username=principal if endpoint == "sign-in" else None,
                client_id=client_id if endpoint == "sign-in" else principal,
                client_address=attempt.address or None,
            )
        except Exception:  # the refusal is answered whatever happens to its record
            log.exception("Could not record the AuditEvent of a refused %s", action)
