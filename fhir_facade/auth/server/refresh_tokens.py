"""Refresh tokens of the built-in authorization server (SMART App Launch 2.x ``online_access`` and
``offline_access``; RFC 6749 1.5, 6; OAuth 2.0 Security BCP (RFC 9700) 4.14; ADR 0047).

A refresh token is an opaque random value. The store keeps only its SHA-256, so the table never
holds a redeemable secret, and any replica on the database can redeem it (ADR 0032). Each one is
bound to the client, the user, the granted scope and the launch context (patient, encounter) it was
issued with; a refresh gives an access token for that grant (or a part of it), never more.

Rotation with replay detection: every refresh token belongs to a *family* (one sign-in). Redeeming
one marks it used and issues its successor in the same family; presenting a used one again means two
parties hold the family's tokens (a stolen token, or the app and a thief), so the whole family is
revoked and the newest token fails too. Public clients authenticate with their client_id only
(RFC 6749 2.3, 10.4), which is why rotation is what protects them.

A family lives for an absolute lifetime from the sign-in (``online_access``: the online lifetime,
``offline_access``: the offline one), however often it is refreshed; revoking any of its tokens
(RFC 7009, the app's sign-out) revokes the family.

Storage: the store's ``expiring_entry`` table (``ExpiringEntries``), one entry per token and one per
family, each expiring with the family; ``MemoryEntries`` stands in for tests of the grant logic
without a store. Each redemption is one transaction that locks what it reads, so of two concurrent
redemptions of one token exactly one succeeds (the other is treated as a replay).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from fhir_facade.auth.server.users import ResourceOwner

__all__ = [
    "OFFLINE_ACCESS",
    "ONLINE_ACCESS",
    "MemoryEntries",
    "RefreshGrant",
    "RefreshTokenRefused",
    "RefreshTokens",
    "refresh_scope",
]

ONLINE_ACCESS = "online_access"
OFFLINE_ACCESS = "offline_access"

_TOKEN = "refresh-token"
_FAMILY = "refresh-family"


def refresh_scope(scope: str) -> str | None:
    """Which refresh scope a granted ``scope`` carries (``offline_access`` wins), or None."""
    granted = scope.split()
    if OFFLINE_ACCESS in granted:
        return OFFLINE_ACCESS
    if ONLINE_ACCESS in granted:
        return ONLINE_ACCESS
    return None


class RefreshTokenRefused(Exception):
    """The presented refresh token cannot be redeemed (answered ``invalid_grant``); the message says
    why, for the log and the audit record, and never holds the token."""


@dataclass(frozen=True)
class RefreshGrant:
    """What a live refresh token stands for."""

    digest: str
    family: str
    client_id: str
    owner: ResourceOwner
    scope: str
    expires_at: float

    def check_client(self, client: object) -> bool:
        """authlib: the token was issued to this client."""
        get_client_id = getattr(client, "get_client_id", None)
        return get_client_id is not None and get_client_id() == self.client_id

    def get_scope(self) -> str:
        return self.scope


class EntryAccess(Protocol):
    """One open transaction over expiring entries (``store.expiring.EntryTransaction``)."""

    def get(self, kind: str, key: str) -> str | None: ...

    def put(self, kind: str, key: str, value: str, expires_at: datetime) -> None: ...

    def delete(self, kind: str, key: str) -> None: ...


class Entries(Protocol):
    """Expiring entries that can be read and changed in one transaction (``ExpiringEntries``)."""

    def transaction(self) -> AbstractContextManager[EntryAccess]: ...


class MemoryEntries:
    """Expiring entries in process memory, one lock for every transaction (no store: tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[_MemoryTransaction]:
        with self._lock:
            now = datetime.fromtimestamp(self._clock(), UTC)
            for dead in [k for k, (_, until) in self._values.items() if until <= now]:
                del self._values[dead]
            yield _MemoryTransaction(self._values)


class _MemoryTransaction:
    def __init__(self, values: dict[tuple[str, str], tuple[str, datetime]]) -> None:
        self._values = values

    def get(self, kind: str, key: str) -> str | None:
        found = self._values.get((kind, key))
        return found[0] if found is not None else None

    def put(self, kind: str, key: str, value: str, expires_at: datetime) -> None:
        self._values[(kind, key)] = (value, expires_at)

    def delete(self, kind: str, key: str) -> None:
        self._values.pop((kind, key), None)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class RefreshTokens:
    """Issues, rotates and revokes refresh tokens in ``entries`` (see the module docstring)."""

    def __init__(
        self,
        entries: Entries,
        *,
        online_lifetime: int,
        offline_lifetime: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("online_lifetime", online_lifetime), ("offline_lifetime", offline_lifetime)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1 second, not {value}")
        self._entries = entries
        self._lifetimes = {ONLINE_ACCESS: online_lifetime, OFFLINE_ACCESS: offline_lifetime}
        self._clock = clock

    def issue(self, *, client_id: str, owner: ResourceOwner, scope: str) -> str:
        """A refresh token starting a new family for this grant (``scope`` must carry
        ``online_access`` or ``offline_access``, which sets the family's lifetime)."""
        kind = refresh_scope(scope)
        if kind is None:
            raise ValueError("a refresh token needs online_access or offline_access in the scope")
        family = secrets.token_hex(16)
        expires_at = self._clock() + self._lifetimes[kind]
        with self._entries.transaction() as entries:
            entries.put(_FAMILY, family, "", _instant(expires_at))
            return self._add(entries, family, client_id, owner, scope, expires_at)

    def find(self, value: str) -> RefreshGrant:
        """The grant behind a presented token, which stays unused (``rotate`` uses it up).

        Raises RefreshTokenRefused when it is unknown, expired or revoked; a token already used
        is a replay: its family is revoked first (RFC 9700 4.14.2).
        """
        # Refusals are raised after the transaction: raised inside, it would roll the revocation back.
        with self._entries.transaction() as entries:
            found = self._live(entries, value)
        if isinstance(found, str):
            raise RefreshTokenRefused(found)
        return found

    def rotate(self, grant: RefreshGrant) -> str:
        """Use up ``grant``'s token and return its successor in the same family (same grant, same
        end). A concurrent redemption that got there first makes this one a replay."""
        with self._entries.transaction() as entries:
            found = self._live(entries, None, digest=grant.digest)
            if not isinstance(found, str):
                used = json.dumps({**self._data(found), "used": True})
                entries.put(_TOKEN, grant.digest, used, _instant(grant.expires_at))
                return self._add(
                    entries, grant.family, grant.client_id, grant.owner, grant.scope, grant.expires_at
                )
        raise RefreshTokenRefused(found)

    def revoke(self, value: str, client_id: str) -> bool:
        """Revoke the family of ``value`` if it was issued to ``client_id`` (RFC 7009 2.1: the
        refresh token and every token of the same grant); True when there was one."""
        with self._entries.transaction() as entries:
            raw = entries.get(_TOKEN, _digest(value))
            if raw is None:
                return False
            data = json.loads(raw)
            if data["client_id"] != client_id:
                return False
            entries.delete(_FAMILY, data["family"])
            return True

    def _live(self, entries: EntryAccess, value: str | None, *, digest: str = "") -> RefreshGrant | str:
        """The grant of a live, unused token, or why it is refused; a used one revokes its family."""
        digest = _digest(value) if value is not None else digest
        raw = entries.get(_TOKEN, digest)
        if raw is None:
            return "refresh token unknown, expired or revoked"
        data = json.loads(raw)
        if data["used"]:
            entries.delete(_FAMILY, data["family"])
            return "refresh token was already used: its family is revoked"
        if entries.get(_FAMILY, data["family"]) is None:
            return "refresh token revoked"
        expires_at = float(data["expires_at"])
        if expires_at <= self._clock():
            return "refresh token expired"
        return RefreshGrant(
            digest=digest,
            family=data["family"],
            client_id=data["client_id"],
            owner=ResourceOwner(*data["owner"]),
            scope=data["scope"],
            expires_at=expires_at,
        )

    @staticmethod
    def _data(grant: RefreshGrant) -> dict[str, object]:
        owner = grant.owner
        return {
            "family": grant.family,
            "client_id": grant.client_id,
            "owner": [owner.username, owner.fhir_user, owner.patient, owner.encounter],
            "scope": grant.scope,
            "expires_at": grant.expires_at,
            "used": False,
        }

    def _add(
        self,
        entries: EntryAccess,
        family: str,
        client_id: str,
        owner: ResourceOwner,
        scope: str,
        expires_at: float,
    ) -> str:
        value = secrets.token_urlsafe(32)
        data = self._data(RefreshGrant(_digest(value), family, client_id, owner, scope, expires_at))
        entries.put(_TOKEN, _digest(value), json.dumps(data), _instant(expires_at))
        return value
