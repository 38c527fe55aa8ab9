"""Authorization codes: issued at the authorization endpoint, redeemed once at the token endpoint.

`CodeStore` keeps them in process memory; the server itself uses its subclass `SharedCodeStore`
(shared_state.py), which keeps them in the SQL store so that replicas behind one load balancer
share them (ADR 0032).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fhir_facade.auth.server.users import ResourceOwner

__all__ = ["CODE_LIFETIME", "AuthorizationCode", "CodeStore"]

#: Seconds a code stays redeemable (RFC 6749 4.1.2 asks for a short life; 10 min at most).
CODE_LIFETIME = 60


@dataclass(frozen=True)
class AuthorizationCode:
    """What a code stands for; the authlib grant reads it through the ``get_*`` methods."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    owner: ResourceOwner
    code_challenge: str
    code_challenge_method: str
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


class CodeStore:
    """Thread-safe, in-memory, single-use codes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._codes: dict[str, AuthorizationCode] = {}
        self._lock = threading.Lock()

    def expiry(self) -> float:
        """When a code issued now expires (on this store's clock)."""
        return self._clock() + CODE_LIFETIME

    def add(self, code: AuthorizationCode) -> None:
        with self._lock:
            self._purge()
            self._codes[code.code] = code

    def take(self, code: str, client_id: str) -> AuthorizationCode | None:
        """Remove and return the code if it is live and was issued to ``client_id``.

        Any attempt to redeem a code uses it up, whether or not the rest of the request is right: two
        concurrent requests can never both redeem it, and a code that leaked gets one try only.
        """
        with self._lock:
            found = self._codes.pop(code, None)
        if found is None or found.client_id != client_id or found.expires_at <= self._clock():
            return None
        return found

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._codes)

    def _purge(self) -> None:
        now = self._clock()
        for expired in [c for c, entry in self._codes.items() if entry.expires_at <= now]:
            del self._codes[expired]
