"""The built-in authorization server's short-lived state in the store (table `expiring_entry`), so
that replicas behind one load balancer act as one server (docs/adr/0032-replica-leases.md):

- authorization codes: issued by the replica that served the sign-in, redeemable once at any
  replica (the redeeming DELETE is the claim: of two concurrent redemptions one wins);
- sign-in tickets (sign-in form -> patient choice), the same way;
- EHR launch contexts (``launches``): created by the launcher at one replica, checked and taken at
  the authorization endpoint of any replica;
- the `jti` values of accepted private_key_jwt assertions: a replay at another replica is refused.

Each class keeps the interface of its in-memory counterpart (CodeStore, SignInTickets,
JtiReplayCache), which stays for tests of the grant logic on its own. Codes and tickets are stored
under the SHA-256 of their value, so the table never holds a redeemable secret. Times are wall-clock
seconds (time.time), which replicas share; the in-memory stores use the monotonic clock.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fhir_facade.auth.server.assertions import JtiReplayCache
from fhir_facade.auth.server.codes import AuthorizationCode, CodeStore
from fhir_facade.auth.server.launches import LAUNCH_LIFETIME, LaunchContext, LaunchContexts
from fhir_facade.auth.server.tickets import TICKET_LIFETIME, SignInTickets
from fhir_facade.auth.server.users import ResourceOwner
from fhir_facade.store.expiring import ExpiringEntries

__all__ = ["SharedCodeStore", "SharedJtiReplayCache", "SharedLaunchContexts", "SharedSignInTickets"]

_CODE = "auth-code"
_TICKET = "sign-in-ticket"
_JTI = "assertion-jti"
_LAUNCH = "ehr-launch"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class SharedCodeStore(CodeStore):
    """Single-use authorization codes in the store."""

    def __init__(self, entries: ExpiringEntries, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._entries = entries

    def add(self, code: AuthorizationCode) -> None:
        value = json.dumps(
            {
                "client_id": code.client_id,
                "redirect_uri": code.redirect_uri,
                "scope": code.scope,
                "owner": [
                    code.owner.username,
                    code.owner.fhir_user,
                    code.owner.patient,
                    code.owner.encounter,
                ],
                "code_challenge": code.code_challenge,
                "code_challenge_method": code.code_challenge_method,
                "expires_at": code.expires_at,
            }
        )
        self._entries.put(_CODE, _digest(code.code), value, _instant(code.expires_at))

    def take(self, code: str, client_id: str) -> AuthorizationCode | None:
        """Remove and return the code if it is live and was issued to ``client_id``; any attempt uses
        it up (see CodeStore.take), at whichever replica it lands."""
        raw = self._entries.take(_CODE, _digest(code))
        if raw is None:
            return None
        data = json.loads(raw)
        found = AuthorizationCode(
            code=code,
            client_id=data["client_id"],
            redirect_uri=data["redirect_uri"],
            scope=data["scope"],
            owner=ResourceOwner(*data["owner"]),
            code_challenge=data["code_challenge"],
            code_challenge_method=data["code_challenge_method"],
            expires_at=float(data["expires_at"]),
        )
        if found.client_id != client_id or found.expires_at <= self._clock():
            return None
        return found

    def __len__(self) -> int:
        return self._entries.count(_CODE)


class SharedSignInTickets(SignInTickets):
    """Single-use sign-in tickets in the store."""

    def __init__(self, entries: ExpiringEntries, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._entries = entries

    def issue(self, username: str, fingerprint: str) -> str:
        ticket = secrets.token_urlsafe(32)
        value = json.dumps({"username": username, "fingerprint": fingerprint})
        self._entries.put(_TICKET, _digest(ticket), value, _instant(self._clock() + TICKET_LIFETIME))
        return ticket

    def redeem(self, ticket: str, fingerprint: str) -> str | None:
        raw = self._entries.take(_TICKET, _digest(ticket))
        if raw is None:
            return None
        data = json.loads(raw)
        return str(data["username"]) if data["fingerprint"] == fingerprint else None


class SharedJtiReplayCache(JtiReplayCache):
    """The jti values of accepted assertions in the store, until the assertions expire."""

    def __init__(self, entries: ExpiringEntries, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._entries = entries

    def first_use(self, client_id: str, jti: str, forget_after: float) -> bool:
        """Record ``jti``; False when the client already used it, at any replica."""
        until = max(forget_after, self._clock() + 1)
        return self._entries.add_if_absent(_JTI, _digest(client_id, jti), "", _instant(until))


class SharedLaunchContexts(LaunchContexts):
    """EHR launch contexts in the store, under the SHA-256 of the launch value."""

    def __init__(
        self,
        entries: ExpiringEntries,
        clock: Callable[[], float] = time.time,
        lifetime: int = LAUNCH_LIFETIME,
    ) -> None:
        super().__init__(clock, lifetime)
        self._entries = entries

    def _store(self, value: str, context: LaunchContext) -> None:
        data = json.dumps(
            {
                "client_id": context.client_id,
                "patient": context.patient,
                "username": context.username,
                "encounter": context.encounter,
                "expires_at": context.expires_at,
            }
        )
        self._entries.put(_LAUNCH, _digest(value), data, _instant(context.expires_at))

    def _read(self, value: str, *, take: bool) -> LaunchContext | None:
        if take:
            raw = self._entries.take(_LAUNCH, _digest(value))
        else:
            with self._entries.transaction() as transaction:
                raw = transaction.get(_LAUNCH, _digest(value))
        if raw is None:
            return None
        data = json.loads(raw)
        return LaunchContext(
            client_id=data["client_id"],
            patient=data["patient"],
            username=data["username"],
            encounter=data["encounter"],
            expires_at=float(data["expires_at"]),
        )
