"""One HTTP/1.1 connection under the test's control (h11 on a plain socket): to send a head
without its body, a body slowly or in part, and several requests on the same keep-alive
connection, which httpx does not let a test see or steer."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import h11

__all__ = ["RawConnection", "RawResponse"]


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """A client connection to 127.0.0.1:`port`; requests go out one after the other on it."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h11.Connection(our_role=h11.CLIENT)

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sock.close()

    @property
    def reusable(self) -> bool:
        """Whether the last exchange ended with both sides ready for another (no `close`)."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def send_head(
        self, method: str, target: str, headers: dict[str, str] | list[tuple[str, str]] | None = None
    ) -> None:
        """The request line and headers (Host added unless given); the body follows with send_body."""
        if self.reusable:
            self.conn.start_next_cycle()
        fields = list(headers.items() if isinstance(headers, dict) else headers or [])
        if not any(name.lower() == "host" for name, _ in fields):
            fields.insert(0, ("Host", "127.0.0.1"))
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=target, headers=fields)))

    def send_body(self, data: bytes, *, end: bool = True) -> None:
        self.sock.sendall(self.conn.send(h11.Data(data=data)))
        if end:
            self.sock.sendall(self.conn.send(h11.EndOfMessage()))

    def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> RawResponse:
        """One complete request and its response, on this connection."""
        self.send_head(method, target, {**(headers or {}), "Content-Length": str(len(body))})
        self.send_body(body)
        return self.read_response()

    def read_response(self) -> RawResponse:
        """The next response; ConnectionError when the server reset or closed the connection first."""
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)  # ConnectionResetError on a reset
                if not data:
                    raise ConnectionError("the server closed the connection without a response")
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return RawResponse(status, headers, bytes(body))

    def server_closed(self) -> bool:
        """Whether the server closed the connection (cleanly: an orderly end of stream)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return False
