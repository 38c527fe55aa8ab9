"""Request limits and hostile input (ADR 0010): every probe gets a 4xx OperationOutcome, never a
500, and never costs the client the next request on its keep-alive connection; bodies are bounded
in size and in idle time on every route; 405 names exactly the methods a path supports."""

from __future__ import annotations

import base64
import json
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fastapi import FastAPI

from fhir_facade.app import create_app
from fhir_facade.config import Settings
from fhir_facade.embedded import free_port
from fhir_facade.fhir.responses import install_error_handlers
from fhir_facade.http_limits import uvicorn_options
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.raw_http import RawConnection, RawResponse

FHIR_JSON = {"Content-Type": "application/fhir+json"}
#: Nothing listens here: routes that would reach the PACS answer 503, which shows the request
#: got past the limits.
NO_PACS = "http://127.0.0.1:9/dicom-web"
BODY_LIMIT = 64 * 1024
STOW_LIMIT = 256 * 1024
BODY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def limited() -> Iterator[LiveServer]:
    """FACADE_AUTH=none with small body limits and a short body timeout; JSON limits at their
    defaults (depth 100, numbers of 64 characters)."""
    with serve(
        {
            "dicomweb_url": NO_PACS,
            "limits_max_body_bytes": BODY_LIMIT,
            "limits_max_stow_body_bytes": STOW_LIMIT,
            "limits_body_timeout": BODY_TIMEOUT,
        }
    ) as server:
        yield server


@pytest.fixture(scope="module")
def builtin_smart() -> Iterator[LiveServer]:
    """FACADE_AUTH=smart with the built-in authorization server (its /auth routes)."""
    with serve(
        {
            "auth": "smart",
            "data_dir": tempfile.mkdtemp(prefix="facade-limits-"),
            "dicomweb_url": NO_PACS,
            "limits_max_body_bytes": BODY_LIMIT,
            "limits_body_timeout": BODY_TIMEOUT,
        }
    ) as server:
        yield server


def raw_outcome(response: RawResponse, status: int, code: str) -> dict[str, Any]:
    """`outcome` for a RawResponse."""
    assert response.status == status, response.body[:500]
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    validate(body)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code, body
    return body


def observation(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "limits"}, **extra}


def nested_extension(levels: int, leaf: dict[str, Any] | None = None) -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "http://example.org/leaf", **(leaf or {"valueString": "x"})}
    for _ in range(levels):
        extension = {"url": "http://example.org/node", "extension": [extension]}
    return extension


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def _transaction(resource: dict[str, Any]) -> bytes:
    entry = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [entry]}).encode()


#: The attacker's probes (part A of the issue) and their kin: method, target, body, status, code.
PROBES = {
    "5000-digit integer": (
        "POST",
        "/fhir/Observation",
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueInteger":'
        + b"9" * 5000
        + b"}",
        400,
        "structure",
    ),
    "JSON nested 1000 deep": (
        "POST",
        "/fhir/Observation",
        b'{"resourceType":"Observation","status":"final","x":' + b"[" * 1000 + b"]" * 1000 + b"}",
        400,
        "structure",
    ),
    "400-deep extension in a transaction": (
        "POST",
        "/fhir",
        _transaction(observation(extension=[nested_extension(400)])),
        400,
        "structure",
    ),
    "huge version id": ("GET", "/fhir/Observation/x/_history/99999999999999999999999", b"", 404, "not-found"),
    "non-ASCII digit version id": ("GET", "/fhir/Observation/x/_history/%C2%B2", b"", 404, "not-found"),
    "non-ASCII digit _count": ("GET", "/fhir/Observation?_count=%C2%B2", b"", 400, "invalid"),
    "5000-digit _count": ("GET", "/fhir/Observation?_count=" + "9" * 5000, b"", 400, "invalid"),
    "5000-digit history _offset": (
        "GET",
        "/fhir/Observation/_history?_offset=" + "9" * 5000,
        b"",
        400,
        "invalid",
    ),
    "5000-digit If-Match version": (
        "PUT",
        "/fhir/Observation/x",
        json.dumps(observation(id="x")).encode(),
        412,
        "conflict",
    ),
    "NaN": (
        "POST",
        "/fhir/Observation",
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":NaN}}',
        400,
        "structure",
    ),
    "1e999 (infinite)": (
        "POST",
        "/fhir/Observation",
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1e999}}',
        400,
        "structure",
    ),
}


#: Headers some probes send besides the FHIR JSON content type.
PROBE_HEADERS = {"5000-digit If-Match version": {"If-Match": 'W/"' + "9" * 5000 + '"'}}


@pytest.mark.parametrize("probe", PROBES)
def test_probe_is_a_4xx_and_the_connection_serves_the_next_request(limited: LiveServer, probe: str) -> None:
    method, target, body, status, code = PROBES[probe]
    headers = {**FHIR_JSON, **PROBE_HEADERS.get(probe, {})}
    with RawConnection(limited.port) as connection:
        raw_outcome(connection.request(method, target, headers, body), status, code)
        assert connection.request("GET", "/fhir/metadata").status == 200


def test_probes_through_one_httpx_client(limited: LiveServer) -> None:
    """The same probes through one httpx.Client, as a real client reuses its pooled connection."""
    with httpx.Client(base_url=f"http://127.0.0.1:{limited.port}", timeout=10) as client:
        for probe, (method, target, body, status, code) in PROBES.items():
            headers = {**FHIR_JSON, **PROBE_HEADERS.get(probe, {})}
            outcome(client.request(method, target, content=body or None, headers=headers), status, code)
            assert client.get("/fhir/metadata").status_code == 200


def test_json_depth_and_number_limits_are_exact(limited: LiveServer) -> None:
    """Depth 100 and 64-character numbers pass; one more level or character is refused."""
    with httpx.Client(base_url=limited.base_url, timeout=10, headers=FHIR_JSON) as fhir:
        deepest = observation(extension=[nested_extension(48, {"valueCoding": {"code": "x"}})])
        assert depth_of(deepest) == 100
        ok_json(fhir.post("/Observation", content=json.dumps(deepest)), 201)
        too_deep = observation(extension=[nested_extension(48, {"valueCoding": {"extension": []}})])
        assert depth_of(too_deep) == 101
        body = outcome(fhir.post("/Observation", content=json.dumps(too_deep)), 400, "structure")
        assert "more than 100 deep" in body["issue"][0]["diagnostics"]

        number = "1." + "5" * 62
        assert len(number) == 64
        template = (
            '{"resourceType":"Observation","status":"final","code":{"text":"n"},"valueQuantity":{"value":%s}}'
        )
        ok_json(fhir.post("/Observation", content=template % number), 201)
        body = outcome(fhir.post("/Observation", content=template % (number + "5")), 400, "structure")
        assert "65 characters" in body["issue"][0]["diagnostics"]


def test_an_unexpected_error_keeps_the_connection() -> None:
    """The safety net: a route failing with an exception no handler takes is a 500 OperationOutcome,
    and the connection then serves the next request. No real route of the facade is known to fail
    this way any more, so a route that raises on purpose stands in for the next bug."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine() -> dict[str, str]:
        return {"ok": "yes"}

    port = free_port()
    with LiveServer(app, port), RawConnection(port) as connection:
        raw_outcome(connection.request("GET", "/boom"), 500, "exception")
        assert connection.request("GET", "/fine").status == 200


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


#: A JWS compact serialisation whose header, resp. payload, is JSON nested 3,000 deep.
DEEP_JSON = b"[" * 3000 + b"]" * 3000
DEEP_HEADER_JWT = f"{_b64(DEEP_JSON)}.{_b64(b'{}')}.c2ln"
DEEP_PAYLOAD_JWT = f"{_b64(json.dumps({'alg': 'RS384', 'typ': 'JWT'}).encode())}.{_b64(DEEP_JSON)}.c2ln"


def test_deeply_nested_tokens_are_refused_not_500(builtin_smart: LiveServer) -> None:
    """A bearer token with a deeply nested header is 401 invalid_token (RFC 6750 3.1); a client
    assertion with a deeply nested payload is 400 invalid_client (RFC 6749 5.2); both on one
    connection that then serves the next request."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assertion = urlencode(
        {
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": DEEP_PAYLOAD_JWT,
        }
    ).encode()
    with RawConnection(builtin_smart.port) as connection:
        refused = connection.request(
            "GET", "/fhir/Observation", {"Authorization": f"Bearer {DEEP_HEADER_JWT}"}
        )
        raw_outcome(refused, 401, "login")
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        answer = connection.request("POST", "/auth/token", form, assertion)
        assert answer.status == 400 and answer.json()["error"] == "invalid_client", answer.body
        assert connection.request("GET", "/fhir/metadata").status == 200


# --- Body size -------------------------------------------------------------------------------


def test_declared_oversize_body_is_413_before_it_is_read(limited: LiveServer) -> None:
    """The head alone (Content-Length: 1 GiB, no body) is answered at once, and the connection closed."""
    with RawConnection(limited.port) as connection:
        started = time.monotonic()
        connection.send_head("POST", "/fhir/Observation", {**FHIR_JSON, "Content-Length": "1073741824"})
        answer = connection.read_response()
        assert time.monotonic() - started < BODY_TIMEOUT
        body = raw_outcome(answer, 413, "too-long")
        assert str(BODY_LIMIT) in body["issue"][0]["diagnostics"]
        assert answer.headers["connection"] == "close"
        assert connection.server_closed()


def test_oversize_observation_is_refused_and_not_stored(limited: LiveServer) -> None:
    """An Observation one byte over the limit is 413 and not stored; one at the limit is created."""
    with httpx.Client(base_url=limited.base_url, timeout=10, headers=FHIR_JSON) as fhir:

        def padded(marker: str, size: int) -> bytes:
            coding = [{"system": "http://example.org/limits", "code": marker}]
            resource = observation(code={"coding": coding}, note=[{"text": ""}])
            filler = size - len(json.dumps(resource).encode())
            resource["note"][0]["text"] = "x" * filler
            data = json.dumps(resource).encode()
            assert len(data) == size
            return data

        outcome(fhir.post("/Observation", content=padded("too-big", BODY_LIMIT + 1)), 413, "too-long")
        ok_json(fhir.post("/Observation", content=padded("just-fits", BODY_LIMIT)), 201)
        for marker, stored in (("too-big", 0), ("just-fits", 1)):
            found = ok_json(fhir.get("/Observation", params={"code": f"http://example.org/limits|{marker}"}))
            assert len(found.get("entry", [])) == stored


def test_chunked_oversize_body_is_413_while_it_is_read(limited: LiveServer) -> None:
    """No Content-Length (chunked transfer coding): the body is counted as it arrives."""

    def chunks() -> Iterator[bytes]:
        yield b'{"resourceType":"Observation","status":"final","code":{"text":"chunked"},"note":[{"text":"'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}]}'

    with httpx.Client(base_url=limited.base_url, timeout=10, headers=FHIR_JSON) as fhir:
        response = fhir.post("/Observation", content=chunks())
        assert "content-length" not in response.request.headers
        outcome(response, 413, "too-long")
        assert response.headers["connection"] == "close"


@pytest.mark.parametrize(
    "target",
    ["/fhir", "/fhir/ImagingStudy/1.2.3/$analyze", "/fhir/Observation/_search", "/fhir/no-such-route"],
)
def test_every_route_has_the_body_limit(limited: LiveServer, target: str) -> None:
    """Bundles, $analyze, POSTed searches and even a path no route takes: refused by size first."""
    with httpx.Client(base_url=f"http://127.0.0.1:{limited.port}", timeout=10) as client:
        response = client.post(target, content=b"{" + b" " * BODY_LIMIT + b"}", headers=FHIR_JSON)
        outcome(response, 413, "too-long")


def test_auth_routes_have_the_body_limit(builtin_smart: LiveServer) -> None:
    """The built-in authorization server's token and sign-in endpoints: 413 before any credential check."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with httpx.Client(base_url=f"http://127.0.0.1:{builtin_smart.port}", timeout=10) as client:
        for target in ("/auth/token", "/auth/authorize"):
            outcome(client.post(target, content=b"a=" + b"b" * BODY_LIMIT, headers=form), 413, "too-long")
            chunked = iter([b"grant_type=", b"x" * BODY_LIMIT])
            outcome(client.post(target, content=chunked, headers=form), 413, "too-long")
        # Within the limit the endpoint answers as before (an OAuth error, RFC 6749 5.2).
        small = client.post("/auth/token", content=b"grant_type=client_credentials", headers=form)
        assert 400 <= small.status_code < 500 and small.json()["error"]


def test_stow_has_its_own_larger_limit(limited: LiveServer) -> None:
    """STOW-RS bodies (POST under /dicom-web) may exceed the default limit up to the STOW limit."""
    multipart = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    with httpx.Client(base_url=f"http://127.0.0.1:{limited.port}", timeout=10) as client:
        over_default = client.post("/dicom-web/studies", content=b"\0" * (BODY_LIMIT * 2), headers=multipart)
        # Past the size limits, the STOW parser itself refuses zeros as a body without a delimiter.
        outcome(over_default, 400, "invalid")
        assert "boundary" in over_default.text
        outcome(
            client.post("/dicom-web/studies", content=b"\0" * (STOW_LIMIT + 1), headers=multipart),
            413,
            "too-long",
        )


# --- Body time -------------------------------------------------------------------------------


def test_stalled_body_is_408_and_the_connection_closed(limited: LiveServer) -> None:
    """A client that announces a body and stops sending it is answered 408 after the body timeout."""
    with RawConnection(limited.port) as connection:
        connection.send_head("POST", "/fhir/Observation", {**FHIR_JSON, "Content-Length": "60000"})
        started = time.monotonic()
        connection.send_body(b'{"resourceType"', end=False)
        answer = connection.read_response()
        waited = time.monotonic() - started
        assert BODY_TIMEOUT * 0.9 <= waited < BODY_TIMEOUT + 3, waited
        raw_outcome(answer, 408, "timeout")
        assert answer.headers["connection"] == "close"
        assert connection.server_closed()


def test_the_attackers_gigabyte_head_is_answered_promptly(builtin_smart: LiveServer) -> None:
    """The probe as reported: Content-Length 1 GiB and a few bytes, on /auth/token."""
    with RawConnection(builtin_smart.port) as connection:
        connection.send_head(
            "POST",
            "/auth/token",
            {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "1073741824"},
        )
        connection.send_body(b"grant_type", end=False)
        raw_outcome(connection.read_response(), 413, "too-long")


def test_a_slow_but_steady_body_is_accepted(limited: LiveServer) -> None:
    """The timeout bounds the silence between chunks, not the whole upload."""
    data = json.dumps(observation(code={"text": "slow"})).encode()
    pieces = [data[i : i + 20] for i in range(0, len(data), 20)]
    with RawConnection(limited.port) as connection:
        connection.send_head("POST", "/fhir/Observation", {**FHIR_JSON, "Content-Length": str(len(data))})
        started = time.monotonic()
        for piece in pieces:
            connection.send_body(piece, end=False)
            time.sleep(BODY_TIMEOUT * 0.4)
        connection.send_body(b"")
        answer = connection.read_response()
        assert time.monotonic() - started > BODY_TIMEOUT * 1.5
        assert answer.status == 201, answer.body


# --- 405 and Allow ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/fhir/Observation", "GET, POST, PUT"),
        ("PATCH", "/fhir/Observation/some-id", "GET, PUT, DELETE"),
        ("DELETE", "/fhir/metadata", "GET"),
        ("POST", "/fhir/AuditEvent", "GET"),
        ("DELETE", "/fhir/AuditEvent/some-id", "GET"),
        ("PUT", "/fhir", "POST"),
    ],
)
def test_405_names_exactly_the_methods_of_the_path(
    limited: LiveServer, method: str, path: str, allowed: str
) -> None:
    """RFC 9110 15.5.6: a 405 carries Allow with the target's supported methods (Starlette named only
    the first matching route's); each one named is answered by something other than 405."""
    with httpx.Client(base_url=f"http://127.0.0.1:{limited.port}", timeout=10) as client:
        response = client.request(method, path, content=b"{}", headers=FHIR_JSON)
        outcome(response, 405, "not-supported")
        assert response.headers["allow"] == allowed
        for other in allowed.split(", "):
            content = b"{}" if other in ("POST", "PUT") else None
            answer = client.request(other, path, content=content, headers=FHIR_JSON)
            assert answer.status_code != 405, (other, path, answer.text)


# --- What the server bounds (the run command's uvicorn settings) -----------------------------


def test_server_options_bound_the_head_and_idle_connections(tmp_path: Any) -> None:
    """uvicorn_options (what `fhir-facade serve` passes to uvicorn) is accepted by uvicorn and bounds
    the request head (400 from the server, before the application) and idle keep-alive connections."""
    port = free_port()
    settings = Settings(
        base_url=f"http://127.0.0.1:{port}/fhir",
        dicomweb_url=NO_PACS,
        database_url=f"sqlite:///{tmp_path}/store.sqlite3",
        watch_studies=False,
        analyze_enabled=False,
        limits_max_header_bytes=4096,
        limits_keep_alive_timeout=1.0,
    )
    with LiveServer(create_app(settings), port, uvicorn_options(settings)):
        with RawConnection(port) as connection:
            assert connection.request("GET", "/fhir/metadata", {"X-Pad": "x" * 2000}).status == 200
            time.sleep(1.6)
            assert connection.server_closed()
        # h11 bounds the head it buffers while waiting for its end (a slowly sent head).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"x" * 8000)
            time.sleep(0.3)
            sock.sendall(b"\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
