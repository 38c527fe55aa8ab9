"""A real rest-hook receiver: an HTTP server on a loopback port that keeps every notification it
is POSTed, and that a test can take down and bring back up on the same port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir_facade.embedded import free_port


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        #: Seconds each answer waits (after the notification is kept): a slow receiver.
        self.delay = 0.0
        #: Paths answered 500 (the notification is kept all the same): a refusing receiver.
        self.fail_paths: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with owner._lock:
                    owner.received.append((self.path, dict(self.headers.items()), body))
                if owner.delay:
                    time.sleep(owner.delay)
                self.send_response(500 if self.path in owner.fail_paths else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bundles(self, path: str = "/hook") -> list[dict[str, Any]]:
        with self._lock:
            return [body for p, _, body in self.received if p == path]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received: {json.dumps(self.received)[:3000]}")
            time.sleep(0.05)


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The SubscriptionStatus Parameters (first entry) as {name: value or [parts]}."""
    parameters = bundle["entry"][0]["resource"]
    found: dict[str, Any] = {}
    for p in parameters["parameter"]:
        if p["name"] == "notification-event":
            found.setdefault("events", []).append(
                {
                    part["name"]: next(v for k, v in part.items() if k.startswith("value"))
                    for part in p["part"]
                }
            )
        else:
            found[p["name"]] = next(v for k, v in p.items() if k.startswith("value"))
    return found
