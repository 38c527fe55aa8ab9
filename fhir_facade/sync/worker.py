"""The sync worker: drains the outbox to the upstream FHIR server.

For each leased resource it sends the newest leased version (earlier ones are superseded: the
upstream only needs the current state, and a PUT by id is idempotent), as one `batch` Bundle
when several resources are due (one entry each, so order per resource holds), after upserting a snapshot
of every *virtual* resource it references (ImagingStudy, Patient, Endpoint: computed live from
the PACS, so the upstream has no copy unless we give it one) under the same id, so references
resolve upstream unchanged. Failures: transient ones are retried with exponential backoff and
full jitter, honouring Retry-After; a refusal (e.g. 422 from the upstream validator) turns the
rows into dead letters, with the upstream's answer kept, and the rest keeps flowing.

Correlation: each upstream request carries one X-Correlation-ID: a single resource's PUT/DELETE
that of the request which wrote the version sent; a batch Bundle the shared id of its versions'
requests, or, when they came from several requests, a fresh id logged with the per-resource ids
(`SyncWorker._batch_correlation_id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir_facade.correlation import correlation_scope, new_correlation_id
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.references import parse_reference
from fhir_facade.store import ResourceStore
from fhir_facade.sync.outbox_queue import OutboxQueue, OutboxRow
from fhir_facade.sync.upstream import Outcome, UpstreamAnswer, UpstreamClient

__all__ = ["VIRTUAL_TYPES", "SyncWorker", "VirtualReader"]

log = logging.getLogger(__name__)

#: Types the facade computes from the PACS; the sync upserts snapshots of the referenced ones.
VIRTUAL_TYPES = frozenset({"ImagingStudy", "Patient", "Endpoint"})

#: Reads a virtual resource (type, id) live; None when it does not exist.
VirtualReader = Callable[[str, str], Awaitable[dict[str, Any] | None]]


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str):
            yield reference
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def virtual_references(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, id) of every relative reference to a virtual type, in order, once each."""
    found: dict[tuple[str, str], None] = {}
    for reference in _references(resource):
        parsed = parse_reference(reference)
        if parsed.is_local and parsed.version is None and parsed.resource_type in VIRTUAL_TYPES and parsed.id:
            found[(parsed.resource_type, parsed.id)] = None
    return list(found)


class SyncWorker:
    """Leases outbox rows and pushes them; `run_once` is one round, `run_forever` the loop."""

    def __init__(
        self,
        store: ResourceStore,
        queue: OutboxQueue,
        upstream: UpstreamClient,
        read_virtual: VirtualReader,
        *,
        batch_size: int = 50,
        lease_seconds: float = 60.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
    ) -> None:
        self._store = store
        self._queue = queue
        self._upstream = upstream
        self._read_virtual = read_virtual
        self._batch_size = batch_size
        self._lease_seconds = lease_seconds
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._mirrored: dict[tuple[str, str], str] = {}  # virtual (type, id) -> digest sent
        # Virtual resources already read and mirrored in the current round: a batch of 50
        # results of one study reads that study from the PACS once, not 50 times.
        self._fresh: set[tuple[str, str]] = set()
        self.sent = 0
        self.failures = 0

    async def run_forever(self, stop: asyncio.Event, poll_interval: float) -> None:
        while not stop.is_set():
            try:
                with correlation_scope():  # a fresh id per round; deliveries use their rows' ids
                    busy = await self.run_once()
            except Exception:
                log.exception("Sync round failed; retrying")
                busy = 0
            if busy:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval)

    async def run_once(self) -> int:
        """Lease and push one batch; returns how many rows were leased."""
        rows = await asyncio.to_thread(self._queue.lease, self._batch_size, self._lease_seconds)
        self._fresh.clear()
        by_resource: dict[tuple[str, str], list[OutboxRow]] = {}
        for row in rows:
            by_resource.setdefault((row.resource_type, row.resource_id), []).append(row)
        if len(by_resource) == 1:
            ((resource_type, resource_id), group), *_ = by_resource.items()
            await self._push(resource_type, resource_id, group)
        elif by_resource:
            await self._push_batch(by_resource)
        return len(rows)

    async def _push_batch(self, by_resource: dict[tuple[str, str], list[OutboxRow]]) -> None:
        """Many resources due: one `batch` Bundle, one entry per resource (its newest version),
        sent under one correlation id (`_batch_correlation_id`)."""
        with correlation_scope(self._batch_correlation_id(by_resource), inherit=True):
            await self._send_batch(by_resource)

    @staticmethod
    def _batch_correlation_id(by_resource: dict[tuple[str, str], list[OutboxRow]]) -> str | None:
        """The X-Correlation-ID of a batch Bundle: one HTTP request carries one id. When every
        version in it was written by the same request, that request's id (None when written
        outside any request: the round's id is used); otherwise a fresh id for the Bundle, logged
        once with the id of each resource's request, so a request's id still leads (through
        this line) to the upstream request that delivered its writes."""
        ids = {rows[-1].correlation_id for rows in by_resource.values()}
        if len(ids) == 1:
            return ids.pop()
        batch_id = new_correlation_id()
        log.info(
            "Upstream batch %s delivers writes of several requests: %s",
            batch_id,
            ", ".join(f"{t}/{i} ({rows[-1].correlation_id or '-'})" for (t, i), rows in by_resource.items()),
        )
        return batch_id

    async def _send_batch(self, by_resource: dict[tuple[str, str], list[OutboxRow]]) -> None:
        entries: list[dict[str, Any]] = []
        groups: list[tuple[str, list[OutboxRow]]] = []
        stored = await asyncio.to_thread(
            self._store.versions,
            [(t, i, rows[-1].version_id) for (t, i), rows in by_resource.items() if rows[-1].version_id > 0],
        )
        for (resource_type, resource_id), rows in by_resource.items():
            url = f"{resource_type}/{resource_id}"
            if rows[-1].deleted:
                entries.append({"request": {"method": "DELETE", "url": url}})
            else:
                newest = rows[-1]
                resource = (
                    stored.get((resource_type, resource_id, newest.version_id))
                    if newest.version_id > 0
                    else await self._version(newest)
                )
                if resource is None:
                    await asyncio.to_thread(self._queue.mark_sent, [r.seq for r in rows])
                    continue
                mirrored = await self._mirror_virtual(resource)
                if mirrored.outcome is not Outcome.DONE:
                    attempts = max(row.attempts for row in rows) + 1
                    await asyncio.to_thread(self._record, [r.seq for r in rows], attempts, mirrored, url)
                    continue
                body = {k: v for k, v in resource.items() if k != "meta"}
                entries.append({"resource": body, "request": {"method": "PUT", "url": url}})
            groups.append((url, rows))
        if not entries:
            return
        answers = await asyncio.to_thread(self._upstream.batch, entries)
        if isinstance(answers, UpstreamAnswer):
            if answers.outcome is Outcome.REFUSED:  # the upstream refused the Bundle: one by one
                for url, rows in groups:
                    resource_type, resource_id = url.split("/", 1)
                    await self._push(resource_type, resource_id, rows)
                return
            answers = [answers] * len(groups)
        delivered = [
            row.seq
            for (_, rows), answer in zip(groups, answers, strict=True)
            if answer.outcome is Outcome.DONE
            for row in rows
        ]
        if delivered:  # one transaction for every delivered row of the batch
            await asyncio.to_thread(self._queue.mark_sent, delivered)
            self.sent += len(delivered)
        for (url, rows), answer in zip(groups, answers, strict=True):
            if answer.outcome is not Outcome.DONE:
                attempts = max(row.attempts for row in rows) + 1
                await asyncio.to_thread(self._record, [r.seq for r in rows], attempts, answer, url)

    async def _push(self, resource_type: str, resource_id: str, rows: list[OutboxRow]) -> None:
        """One resource's newest version, under the correlation id of the request that wrote it
        (the upstream request, and any PACS read for mirroring, carry it)."""
        with correlation_scope(rows[-1].correlation_id, inherit=True):
            await self._push_one(resource_type, resource_id, rows)

    async def _push_one(self, resource_type: str, resource_id: str, rows: list[OutboxRow]) -> None:
        newest = rows[-1]
        seqs = [row.seq for row in rows]
        attempts = max(row.attempts for row in rows) + 1
        if newest.deleted:
            answer = await asyncio.to_thread(self._upstream.delete, resource_type, resource_id)
        else:
            resource = await self._version(newest)
            if resource is None:
                await asyncio.to_thread(self._queue.mark_sent, seqs)  # a snapshot of nothing
                return
            answer = await self._mirror_virtual(resource)
            if answer.outcome is Outcome.DONE:
                answer = await asyncio.to_thread(self._upstream.put, resource)
        await asyncio.to_thread(self._record, seqs, attempts, answer, f"{resource_type}/{resource_id}")

    async def _version(self, row: OutboxRow) -> dict[str, Any] | None:
        """The stored version a row names, or for version 0 a live snapshot of a virtual
        resource (None when the PACS no longer has it)."""
        if row.version_id == 0:
            return await self._read_virtual(row.resource_type, row.resource_id)
        return await asyncio.to_thread(
            self._store.vread, row.resource_type, row.resource_id, str(row.version_id)
        )

    async def _mirror_virtual(self, resource: dict[str, Any]) -> UpstreamAnswer:
        """Upsert the virtual resources `resource` references, each snapshot once per content."""
        for resource_type, resource_id in virtual_references(resource):
            key = (resource_type, resource_id)
            if key in self._fresh or (
                resource_type == resource["resourceType"] and resource_id == resource.get("id")
            ):
                continue
            try:
                snapshot = await self._read_virtual(resource_type, resource_id)
            except FhirError as error:
                if error.status == 503:
                    return UpstreamAnswer(Outcome.RETRY, None, f"PACS unavailable: {error}")
                raise
            if snapshot is None:
                self._fresh.add(key)
                continue  # nothing to mirror: the reference stays dangling upstream, as here
            digest = hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest()
            if self._mirrored.get(key) == digest:
                self._fresh.add(key)
                continue
            answer = await asyncio.to_thread(self._upstream.put, snapshot)
            if answer.outcome is not Outcome.DONE:
                return UpstreamAnswer(
                    answer.outcome,
                    answer.status,
                    f"snapshot {resource_type}/{resource_id}: {answer.detail}",
                    answer.retry_after,
                )
            self._mirrored[key] = digest
            self._fresh.add(key)
        return UpstreamAnswer(Outcome.DONE, None, "")

    def _record(self, seqs: list[int], attempts: int, answer: UpstreamAnswer, what: str) -> None:
        if answer.outcome is Outcome.DONE:
            self._queue.mark_sent(seqs)
            self.sent += len(seqs)
            return
        self.failures += 1
        if answer.outcome is Outcome.REFUSED:
            log.error("Upstream refused %s (%s): dead letter. %s", what, answer.status, answer.detail[:500])
            self._queue.mark_dead(seqs, attempts, answer.detail)
            return
        delay = self.backoff(attempts, answer.retry_after)
        log.warning("Upstream write of %s failed (%s); retry in %.1f s", what, answer.status, delay)
        self._queue.retry_later(seqs, attempts, datetime.now(UTC) + timedelta(seconds=delay), answer.detail)

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter (capped), but never sooner than Retry-After."""
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** (attempts - 1))
        delay = random.uniform(0, ceiling)
        return max(delay, retry_after or 0.0)
