"""Sign-in tickets: carry "this user has entered the right password" from the sign-in form to the
patient choice, without a session cookie and without sending the password twice.

A ticket is bound to the exact authorization request it was issued for (a fingerprint of its
parameters), lives five minutes and is used once. In process memory, like the codes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["AUTHORIZATION_PARAMETERS", "SignInTickets", "request_fingerprint"]

#: The authorization request's parameters (RFC 6749 4.1.1, RFC 7636 4.3, SMART App Launch): what the
#: sign-in pages carry along as hidden fields. Anything else in the request is ignored (RFC 6749 3.1).
AUTHORIZATION_PARAMETERS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "aud",
    "launch",
    "code_challenge",
    "code_challenge_method",
)

TICKET_LIFETIME = 300


def request_fingerprint(parameters: Mapping[str, str]) -> str:
    """A digest of the authorization parameters, so a ticket only works for its own request."""
    chosen = {name: parameters.get(name) for name in AUTHORIZATION_PARAMETERS}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Ticket:
    username: str
    fingerprint: str
    expires_at: float


class SignInTickets:
    """Thread-safe, single-use tickets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()

    def issue(self, username: str, fingerprint: str) -> str:
        ticket = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for stale in [t for t, entry in self._tickets.items() if entry.expires_at <= now]:
                del self._tickets[stale]
            self._tickets[ticket] = _Ticket(username, fingerprint, now + TICKET_LIFETIME)
        return ticket

    def redeem(self, ticket: str, fingerprint: str) -> str | None:
        """The signed-in username, if the ticket is live and was issued for this request; the ticket is
        used up either way."""
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry.expires_at <= self._clock() or entry.fingerprint != fingerprint:
            return None
        return entry.username
