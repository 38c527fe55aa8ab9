"""Brute-force protection for the built-in authorization server: failed attempts are counted per
principal (the username at the sign-in form, the client_id at the token endpoint) and, independently,
per client address; too many in a window lock that key out for a while (OWASP Authentication Cheat
Sheet, "Protect Against Automated Attacks"; NIST SP 800-63B 5.2.2 "Rate Limiting (Throttling)").

- A key is locked after ``failures`` failures within ``window`` seconds; every attempt on a locked key
  is refused *before* the credentials are checked, so the right password does not get through and the
  answer cannot tell whether it was right. The first lockout lasts ``duration`` seconds, each further
  one (a repeat offender, while the key is remembered) twice as long, up to ``max_duration``.
- Before the lockout, each failure is answered after a delay that doubles per failure (``delay`` up
  to ``max_delay``), which slows a serial guesser without hurting a user who mistypes once.
- Attempts in flight count against the budget, so a burst of parallel requests gets no more guesses
  than a serial one.
- A success resets the principal's counter, never the address's (one valid account must not buy an
  attacker fresh guesses at the others).
- State is in this process's memory, or, given ``shared`` entries (the server does), in the store's
  `expiring_entry` table, so that replicas on one database count every failure wherever it lands
  (ADR 0032): each check-and-count is then one database transaction that locks the keys it reads.
  An in-memory table holds at most ``capacity`` keys: entries are forgotten one window after their
  last failure or lockout, and when the table is full the least recently used unlocked entry makes
  room; a shared entry expires one window after its last failure or lockout. Keys longer than any
  username or client_id are stored as their SHA-256, so huge submitted names cost no memory.

Pure and synchronous (thread-safe, clock injected): the routes run it around authlib's worker-thread
calls and do the waiting, logging and auditing themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fhir_facade.config import Settings
    from fhir_facade.store.expiring import EntryTransaction, ExpiringEntries

__all__ = ["Attempt", "LockedKey", "Lockout", "LockoutPolicy", "lockouts_from_settings"]

log = logging.getLogger(__name__)

#: Longer keys are hashed: usernames and client_ids in the registry are at most 200 characters.
_MAX_KEY_LENGTH = 200
#: How many of the least recently used entries are looked at for an unlocked one to evict.
_EVICTION_SCAN = 64

KeyKind = Literal["user", "client", "address"]


@dataclass(frozen=True)
class LockoutPolicy:
    """The numbers of one counter (see the module docstring); validated here, naming the setting."""

    failures: int
    window: float
    duration: float
    max_duration: float
    delay: float
    max_delay: float
    capacity: int

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError(f"failures must be >= 1, got {self.failures}")
        if self.window <= 0 or self.duration <= 0:
            raise ValueError("window and duration must be positive")
        if self.max_duration < self.duration:
            raise ValueError(
                f"max_duration ({self.max_duration}) must be at least duration ({self.duration})"
            )
        if self.delay < 0 or self.max_delay < self.delay:
            raise ValueError(f"need 0 <= delay ({self.delay}) <= max_delay ({self.max_delay})")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")

    def lockout_for(self, strikes: int) -> float:
        """Seconds of the lockout after ``strikes`` earlier ones."""
        return min(self.duration * 2 ** min(strikes, 32), self.max_duration)

    def delay_after(self, failures: int) -> float:
        """Seconds to hold back the answer to the ``failures``-th failure in the window."""
        if failures < 1 or self.delay == 0:
            return 0.0
        return min(self.delay * 2 ** min(failures - 1, 32), self.max_delay)


@dataclass
class _Entry:
    failures: deque[float]
    in_flight: int = 0
    locked_until: float = 0.0
    strikes: int = 0
    last_event: float = 0.0

    def locked(self, now: float) -> bool:
        return self.locked_until > now

    def recent(self, now: float, window: float) -> int:
        while self.failures and self.failures[0] <= now - window:
            self.failures.popleft()
        return len(self.failures)

    def forgettable(self, now: float, window: float) -> bool:
        """Nothing in flight, no lock, and nothing to remember: no failure and no lockout in the last
        window (a repeat offender's strikes are kept for one window after the lockout ends)."""
        if self.in_flight or self.locked(now):
            return False
        return self.last_event + window <= now or (self.strikes == 0 and not self.recent(now, window))


@dataclass(frozen=True)
class LockedKey:
    """A key that a failure has just locked (for the log and the audit)."""

    kind: KeyKind
    key: str
    seconds: float
    failures: int


class _Table:
    """The counters of one kind of key."""

    def __init__(
        self, kind: KeyKind, policy: LockoutPolicy, entries: OrderedDict[str, _Entry] | None = None
    ) -> None:
        self.kind = kind
        self.policy = policy
        self._entries: OrderedDict[str, _Entry] = OrderedDict() if entries is None else entries

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again (locked, or its failure budget is taken by attempts in
        flight); None when it may try now."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.locked(now):
            return entry.locked_until - now
        if entry.recent(now, self.policy.window) + entry.in_flight >= self.policy.failures:
            return 1.0  # the attempts in flight decide: try again when they are answered
        return None

    def reserve(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._new_entry(now)
            self._entries[key] = entry
        self._entries.move_to_end(key)
        entry.in_flight += 1

    def release(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.in_flight = max(entry.in_flight - 1, 0)
        if entry.forgettable(now, self.policy.window):
            del self._entries[key]

    def fail(self, key: str, now: float) -> tuple[int, LockedKey | None]:
        """Count a failure (releasing its reservation); the failures now in the window, and the lock
        this failure started, if any."""
        entry = self._entries.get(key)
        if entry is None:  # evicted while in flight
            entry = self._new_entry(now)
            self._entries[key] = entry
            entry.in_flight = 1
        self._entries.move_to_end(key)
        entry.in_flight = max(entry.in_flight - 1, 0)
        entry.last_event = now
        entry.failures.append(now)
        count = entry.recent(now, self.policy.window)
        if count < self.policy.failures:
            return count, None
        seconds = self.policy.lockout_for(entry.strikes)
        entry.strikes += 1
        entry.locked_until = now + seconds
        entry.last_event = entry.locked_until
        entry.failures.clear()
        return count, LockedKey(self.kind, key, seconds, count)

    def reset(self, key: str) -> None:
        self._entries.pop(key, None)

    def _new_entry(self, now: float) -> _Entry:
        self._purge(now)
        if len(self._entries) >= self.policy.capacity:
            self._evict(now)
        return _Entry(failures=deque(maxlen=self.policy.failures), last_event=now)

    def _purge(self, now: float) -> None:
        """Forget the least recently used entries that have expired (they sit at the front)."""
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if not entry.forgettable(now, self.policy.window):
                return
            del self._entries[key]

    def _evict(self, now: float) -> None:
        """Make room: the least recently used entry that is neither locked nor in flight, else the
        least recently used one (whose lock is thereby lifted early: logged)."""
        victim: str | None = None
        for index, (key, entry) in enumerate(self._entries.items()):
            if index >= _EVICTION_SCAN:
                break
            if entry.in_flight == 0 and not entry.locked(now):
                victim = key
                break
        if victim is None:
            victim = next(iter(self._entries))
            log.warning(
                "Lockout table for %s keys is full (%d): forgetting the oldest lock early",
                self.kind,
                self.policy.capacity,
            )
        del self._entries[victim]


class _SharedEntries(OrderedDict[str, _Entry]):
    """The entries of one table as one store transaction sees them: loaded (and locked) on first
    look-up, written back (or deleted) by `flush`. Only the keys of the attempt at hand are loaded,
    so the in-memory purge and eviction of `_Table` only ever look at those."""

    def __init__(self, transaction: EntryTransaction, kind: str, max_failures: int) -> None:
        super().__init__()
        self._transaction = transaction
        self._kind = kind
        self._max_failures = max_failures
        self._touched: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._touched:
            self._touched.add(key)
            raw = self._transaction.get(self._kind, key)
            if raw is not None:
                super().__setitem__(key, self._decode(raw))
        return super().get(key, default)

    def __setitem__(self, key: str, value: _Entry) -> None:
        self._touched.add(key)
        super().__setitem__(key, value)

    def pop(self, key: str, *default: Any) -> Any:
        self._touched.add(key)
        return super().pop(key, *default)

    def flush(self, window: float) -> None:
        for key in self._touched:
            entry = super().get(key)
            if entry is None:
                self._transaction.delete(self._kind, key)
                continue
            last = max([entry.last_event, entry.locked_until, *entry.failures])
            expires = datetime.fromtimestamp(last + window, UTC)
            self._transaction.put(self._kind, key, self._encode(entry), expires)

    @staticmethod
    def _encode(entry: _Entry) -> str:
        return json.dumps(
            {
                "failures": list(entry.failures),
                "in_flight": entry.in_flight,
                "locked_until": entry.locked_until,
                "strikes": entry.strikes,
                "last_event": entry.last_event,
            }
        )

    def _decode(self, raw: str) -> _Entry:
        data = json.loads(raw)
        return _Entry(
            failures=deque(data["failures"], maxlen=self._max_failures),
            in_flight=int(data["in_flight"]),
            locked_until=float(data["locked_until"]),
            strikes=int(data["strikes"]),
            last_event=float(data["last_event"]),
        )


@dataclass
class Attempt:
    """One sign-in or token request, from admission to its outcome.

    ``retry_after`` is set (whole seconds, for the Retry-After header) when the attempt was refused
    without checking anything; ``refused_by`` names the locked key kinds. Otherwise call ``failed``
    or ``succeeded`` once the credentials were checked, then ``close`` (which releases a reservation
    nothing used). After a failure, ``delay`` is how long to hold back the answer and ``locked`` the
    keys it locked."""

    lockout: Lockout
    principal: str
    address: str
    keys: tuple[str, str]
    retry_after: int | None = None
    refused_by: tuple[KeyKind, ...] = ()
    outcome: Literal["open", "refused", "failed", "succeeded", "released"] = "open"
    #: After a failure: the failures now in the window for the principal (0 when not counted for it)
    #: and for the address.
    failures: tuple[int, int] = (0, 0)
    delay: float = 0.0
    locked: list[LockedKey] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.retry_after is not None

    def failed(self, *, principal: bool = True) -> None:
        """The credentials were wrong. ``principal=False``: count against the address only (a failure
        that says nothing about the principal's credentials, such as a wrong authorization code)."""
        if self.outcome == "open":
            self.lockout._fail(self, principal=principal)

    def succeeded(self) -> None:
        """The credentials were right: the principal's counter starts again."""
        if self.outcome == "open":
            self.lockout._succeed(self)

    def close(self) -> None:
        """Release the reservation when neither ``failed`` nor ``succeeded`` was called."""
        if self.outcome == "open":
            self.lockout._release(self)


class Lockout:
    """The two independent counters of one endpoint: per principal and per client address."""

    def __init__(
        self,
        principal_kind: Literal["user", "client"],
        principal: LockoutPolicy,
        address: LockoutPolicy,
        *,
        clock: Callable[[], float] | None = None,
        shared: ExpiringEntries | None = None,
    ) -> None:
        """``shared``: keep the counters in the store (replicas share them); the clock is then the
        wall clock (time.time), which all replicas agree on, unless one is given."""
        self._principal_kind = principal_kind
        self._policies = (principal, address)
        self._tables = (_Table(principal_kind, principal), _Table("address", address))
        self._clock = clock or (time.time if shared is not None else time.monotonic)
        self._lock = threading.Lock()
        self._shared = shared

    @contextmanager
    def _state(self) -> Iterator[tuple[_Table, _Table]]:
        """The two tables, for one check-and-count: under this process's lock, and, when shared, in
        one store transaction whose changes are written back at the end."""
        with self._lock:
            if self._shared is None:
                yield self._tables
                return
            with self._shared.transaction() as transaction:
                principal, address = self._policies
                entries = (
                    _SharedEntries(transaction, f"lockout:{self._principal_kind}", principal.failures),
                    _SharedEntries(transaction, f"lockout:{self._principal_kind}:address", address.failures),
                )
                yield (
                    _Table(self._principal_kind, principal, entries[0]),
                    _Table("address", address, entries[1]),
                )
                entries[0].flush(principal.window)
                entries[1].flush(address.window)

    def begin(self, principal: str, address: str) -> Attempt:
        """Admit an attempt (reserving it against both budgets) or refuse it (``retry_after`` set)."""
        keys = (_key(principal), _key(address))
        attempt = Attempt(self, principal, address, keys)
        now = self._clock()
        with self._state() as tables:
            waits = [
                (table.kind, table.retry_after(key, now)) for table, key in zip(tables, keys, strict=True)
            ]
            refused = [(kind, wait) for kind, wait in waits if wait is not None]
            if refused:
                attempt.outcome = "refused"
                attempt.refused_by = tuple(kind for kind, _ in refused)
                attempt.retry_after = max(1, math.ceil(max(wait for _, wait in refused)))
                return attempt
            for table, key in zip(tables, keys, strict=True):
                table.reserve(key, now)
        return attempt

    def tracked(self) -> tuple[int, int]:
        """How many principal and address keys are held in memory (for tests and metrics)."""
        with self._lock:
            return len(self._tables[0]), len(self._tables[1])

    def _fail(self, attempt: Attempt, *, principal: bool) -> None:
        now = self._clock()
        with self._state() as (principal_table, address_table):
            own = 0
            if principal:
                own, locked = principal_table.fail(attempt.keys[0], now)
                if locked:
                    attempt.locked.append(locked)
            else:
                principal_table.release(attempt.keys[0], now)
            shared, locked = address_table.fail(attempt.keys[1], now)
            if locked:
                attempt.locked.append(locked)
        attempt.outcome = "failed"
        attempt.failures = (own, shared)
        if not attempt.locked:
            attempt.delay = max(
                principal_table.policy.delay_after(own), address_table.policy.delay_after(shared)
            )

    def _succeed(self, attempt: Attempt) -> None:
        now = self._clock()
        with self._state() as (principal_table, address_table):
            principal_table.reset(attempt.keys[0])
            address_table.release(attempt.keys[1], now)
        attempt.outcome = "succeeded"

    def _release(self, attempt: Attempt) -> None:
        now = self._clock()
        with self._state() as tables:
            for table, key in zip(tables, attempt.keys, strict=True):
                table.release(key, now)
        attempt.outcome = "released"


def _key(value: str) -> str:
    if len(value) <= _MAX_KEY_LENGTH:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def lockouts_from_settings(
    settings: Settings, shared: ExpiringEntries | None = None
) -> tuple[Lockout, Lockout]:
    """The sign-in form's (per username) and the token endpoint's (per client_id) lockouts, each with
    its own per-address counter (``auth_lockout_*`` settings); in the store when ``shared``."""

    def policy(failures: int) -> LockoutPolicy:
        return LockoutPolicy(
            failures=failures,
            window=settings.lockout.window,
            duration=settings.lockout.duration,
            max_duration=max(settings.lockout.max_duration, settings.lockout.duration),
            delay=settings.lockout.delay,
            max_delay=max(settings.lockout.max_delay, settings.lockout.delay),
            capacity=settings.lockout.max_tracked,
        )

    principal, address = (
        policy(settings.lockout.failures),
        policy(settings.lockout.address_failures),
    )
    return (
        Lockout("user", principal, address, shared=shared),
        Lockout("client", principal, address, shared=shared),
    )
