"""Identical requests fired all at once over real HTTP (one connection each), for the tests of
what must stay atomic under concurrency (conditional writes, docs/adr/0012)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import httpx

__all__ = ["PARALLEL", "Send", "all_at_once", "assert_one_created"]

#: How many identical requests race (the probe that found the conditional-write race used 20).
PARALLEL = 50

#: Sends request number n on the client it is given.
Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def all_at_once(base_urls: Sequence[str], send: Send) -> list[httpx.Response]:
    """PARALLEL requests at the same time, one connection each, spread over the base URLs."""
    limits = httpx.Limits(max_connections=PARALLEL, max_keepalive_connections=PARALLEL)
    clients = [httpx.AsyncClient(base_url=url, timeout=120, limits=limits) for url in base_urls]
    try:
        return list(await asyncio.gather(*(send(clients[n % len(clients)], n) for n in range(PARALLEL))))
    finally:
        for client in clients:
            await client.aclose()


def assert_one_created(responses: list[httpx.Response]) -> str:
    """Every answer 200/201 (no 5xx, no 409/412), exactly one 201, all naming the same resource."""
    failures = [(r.status_code, r.text[:300]) for r in responses if r.status_code not in (200, 201)]
    assert not failures, failures[:3]
    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == 1, sorted(statuses)
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, ids
    return ids.pop()
