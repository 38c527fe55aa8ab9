"""Websocket binding tokens (Subscriptions R5 Backport IG 1.1.0, OperationDefinition
backport-subscription-get-ws-binding-token): short-lived, opaque, bound to the caller that asked
for one and to the Subscriptions it named (docs/adr/0028-websocket-channel.md).

A browser's WebSocket cannot send an `Authorization` header, so the token is the socket's only
credential: it is random (256 bits), kept only as its SHA-256 (a database read yields no usable
token), and expires after FACADE_SUBSCRIPTION_WS_TOKEN_SECONDS. It stays valid until then, so a
client whose socket dropped can bind again with it; after that it asks for a new one with its
bearer token. In the database, not in memory: the socket may reach another replica than the one
that issued it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select

from fhir_facade.store.engine import WRITE
from fhir_facade.subscriptions.tables import WS_TOKEN

__all__ = ["Binding", "BindingTokens"]


@dataclass(frozen=True)
class Binding:
    """What a valid token grants: the caller's principal (None: FACADE_AUTH=none) and the
    Subscriptions it may bind to."""

    principal: str | None
    subscriptions: tuple[str, ...]
    expires_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class BindingTokens:
    def __init__(self, engine: Engine, lifetime_seconds: float) -> None:
        self._engine = engine
        self._lifetime = timedelta(seconds=lifetime_seconds)

    def issue(
        self, principal: str | None, subscriptions: tuple[str, ...], now: datetime | None = None
    ) -> tuple[str, datetime]:
        """A new token for `principal` and `subscriptions`, and when it expires. Expired tokens are
        purged on the way (so the table holds only the live ones)."""
        now = now or datetime.now(UTC)
        token = secrets.token_urlsafe(32)
        expires = now + self._lifetime
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            connection.execute(delete(WS_TOKEN).where(WS_TOKEN.c.expires_at < now))
            connection.execute(
                insert(WS_TOKEN).values(
                    token_hash=_digest(token),
                    principal=principal,
                    subscriptions=json.dumps(list(subscriptions)),
                    expires_at=expires,
                )
            )
        return token, expires

    def redeem(self, token: str, now: datetime | None = None) -> Binding | None:
        """The binding of a live token; None for an unknown or expired one (alike)."""
        now = now or datetime.now(UTC)
        with self._engine.connect() as connection:
            row = connection.execute(
                select(WS_TOKEN).where(WS_TOKEN.c.token_hash == _digest(token.strip()))
            ).first()
        if row is None or row.expires_at <= now:
            return None
        return Binding(row.principal, tuple(json.loads(row.subscriptions)), row.expires_at)
