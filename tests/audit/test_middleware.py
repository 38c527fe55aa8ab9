"""The audit middleware reads the caller where the SMART dependency leaves it
(`request.state.access`) and audits refusals, including a 401 before any Access exists and an
unhandled error. A minimal app stands in for the facade's routes (the SMART dependency is wired
into the facade separately); the events go through the real recorder into a real store."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import Engine

from fhir_facade.audit import AuditMiddleware, AuditRecorder
from fhir_facade.auth.access import Access
from fhir_facade.auth.scopes import parse_scopes
from fhir_facade.correlation import install_correlation
from fhir_facade.store import ResourceStore
from tests.audit.conftest import correlation_of, stored_events
from tests.conftest import validate


def authenticate(request: Request) -> Access:
    """Like the SMART dependency: 401 without a token, else an Access on request.state."""
    token = request.headers.get("authorization")
    if token is None:
        raise HTTPException(401, "no token", headers={"WWW-Authenticate": "Bearer"})
    access = Access(
        parse_scopes("user/Task.rs launch/patient"),
        client_id="viewer",
        subject="u-1",
        fhir_user="Practitioner/pr-1",
        patient="P-77",
    )
    request.state.access = access
    return access


def app_with_audit(store: ResourceStore) -> tuple[FastAPI, AuditRecorder]:
    app = FastAPI()

    @app.get("/fhir/Task/{task_id}")
    async def read(task_id: str, access: Access = Depends(authenticate)) -> dict[str, Any]:  # noqa: B008
        if task_id == "forbidden":
            raise HTTPException(403, "insufficient_scope")
        if task_id == "crash":
            raise RuntimeError("crash")
        return {"resourceType": "Task", "id": task_id}

    recorder = AuditRecorder(store)
    app.add_middleware(
        AuditMiddleware,
        recorder=recorder,
        site="https://facade.example",
        base_url="https://facade.example/fhir",
        auth_none=False,
        subject_system="https://facade.example/auth",
    )
    install_correlation(app)
    return app, recorder


def test_caller_outcome_and_refusals(engine: Engine) -> None:
    store = ResourceStore(engine)
    app, recorder = app_with_audit(store)

    async def scenario() -> list[int]:
        await recorder.start()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("192.0.2.7", 5555))
        token = {"Authorization": "Bearer x"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            statuses = [
                (await client.get("/fhir/Task/t-1", headers={**token, "X-Correlation-ID": "ok"})).status_code,
                (await client.get("/fhir/Task/t-1", headers={"X-Correlation-ID": "no-token"})).status_code,
                (
                    await client.get("/fhir/Task/forbidden", headers={**token, "X-Correlation-ID": "403"})
                ).status_code,
                (
                    await client.get("/fhir/Task/crash", headers={**token, "X-Correlation-ID": "crash"})
                ).status_code,
                (await client.get("/docs", headers={"X-Correlation-ID": "docs"})).status_code,
            ]
        await recorder.stop()
        return statuses

    assert asyncio.run(scenario()) == [200, 401, 403, 500, 200]
    events = {correlation_of(e): e for e in stored_events(store)[0]}
    assert set(events) == {"ok", "no-token", "403", "crash"}
    for event in events.values():
        validate(event)
        assert event["agent"][0]["network"]["address"] == "192.0.2.7"

    ok = events["ok"]
    assert ok["outcome"] == "0"
    client, user = ok["agent"]
    assert client["who"]["identifier"]["value"] == "viewer"
    assert user["who"] == {"reference": "Practitioner/pr-1"}
    assert {e["what"]["reference"] for e in ok["entity"] if "reference" in e.get("what", {})} == {
        "Task/t-1",
        "Patient/P-77",
    }

    refused = events["no-token"]
    assert refused["outcome"] == "4"
    (agent,) = refused["agent"]
    assert agent["name"] == "unauthenticated (no valid access token)"

    forbidden = events["403"]
    assert forbidden["outcome"] == "4" and forbidden["agent"][0]["who"]["identifier"]["value"] == "viewer"

    crash = events["crash"]
    assert crash["outcome"] == "8"
    assert crash["outcomeDesc"] == "GET /fhir/Task/crash: 500 Internal Server Error"
