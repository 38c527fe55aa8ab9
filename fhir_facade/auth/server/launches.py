"""EHR launch contexts (SMART App Launch 2.x, app-launch.html "EHR launch"): the opaque ``launch``
value an EHR hands an app, and what it stands for.

The EHR (here: the built-in launcher, ``ehr_launch``) creates a context bound to the app's client_id,
the patient, the launching user and optionally an encounter, and sends the app to its launch URL with
``iss`` and ``launch``. The app passes ``launch`` on to the authorization endpoint, which checks that it
is live and belongs to the app (``grants``) and, once the user has signed in, takes it (single use) and
puts its patient into the token response instead of asking for one (``authorize``).

`LaunchContexts` keeps them in process memory (tests of the logic on their own); the server uses
`SharedLaunchContexts` (shared_state.py), in the store, so any replica can redeem a launch.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LAUNCH_LIFETIME", "LaunchContext", "LaunchContexts"]

#: Seconds a launch stays usable: long enough to load the app and sign in, short enough that a
#: leaked launch URL is soon useless.
LAUNCH_LIFETIME = 300


@dataclass(frozen=True)
class LaunchContext:
    """What a ``launch`` value stands for."""

    client_id: str
    patient: str
    username: str | None
    encounter: str | None
    expires_at: float


class LaunchContexts:
    """Thread-safe, in-memory launch contexts: looked up while the request is validated, taken (used
    up) when the signed-in user is given a code."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, lifetime: int = LAUNCH_LIFETIME) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._contexts: dict[str, LaunchContext] = {}
        self._lock = threading.Lock()

    def create(
        self, *, client_id: str, patient: str, username: str | None, encounter: str | None = None
    ) -> str:
        """A new, unguessable launch value for this context."""
        value = secrets.token_urlsafe(32)
        context = LaunchContext(client_id, patient, username, encounter, self._clock() + self._lifetime)
        self._store(value, context)
        return value

    def find(self, value: str, client_id: str) -> LaunchContext | None:
        """The live context for ``value`` if it was created for ``client_id``; it stays usable."""
        return self._live(self._read(value, take=False), client_id)

    def take(self, value: str, client_id: str) -> LaunchContext | None:
        """Like ``find``, but the launch is used up (whatever the outcome)."""
        return self._live(self._read(value, take=True), client_id)

    def _live(self, context: LaunchContext | None, client_id: str) -> LaunchContext | None:
        if context is None or context.client_id != client_id or context.expires_at <= self._clock():
            return None
        return context

    def _store(self, value: str, context: LaunchContext) -> None:
        now = self._clock()
        with self._lock:
            for stale in [v for v, c in self._contexts.items() if c.expires_at <= now]:
                del self._contexts[stale]
            self._contexts[value] = context

    def _read(self, value: str, *, take: bool) -> LaunchContext | None:
        with self._lock:
            return self._contexts.pop(value, None) if take else self._contexts.get(value)
