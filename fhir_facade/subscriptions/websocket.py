"""The websocket channel (Subscriptions R5 Backport IG 1.1.0, "Channels": websocket;
OperationDefinition backport-subscription-get-ws-binding-token; docs/adr/0028-websocket-channel.md).

1. A client with a bearer token creates a Subscription with `channel.type` websocket, then asks
   `Subscription/{id}/$get-ws-binding-token` (or `Subscription/$get-ws-binding-token?id=..&id=..`).
   Each named Subscription is read through the interaction pipeline with the caller's token, so a
   caller gets a token only for Subscriptions it may see (their author, auth/author_only.py); the
   answer is the IG's Parameters: token, expiration, subscription (each), websocket-url.
2. The client opens the websocket-url (`[base]/subscriptions/ws`, under the FHIR base so a proxy
   that forwards the base forwards it) and sends the text `bind-with-token <token>`. A browser's
   WebSocket cannot carry a bearer token: the binding token is the credential, and the socket route
   has no other. An unknown or expired token closes the socket with 1008 (policy violation).
3. For each Subscription of the token, read again through the pipeline acting as the token's
   caller, the server makes a `requested` subscription `active` (a version written by the server,
   as for rest-hook) and sends a `handshake` notification Bundle, then every event numbered after the bind, in
   order, as `event-notification` Bundles, and a `heartbeat` Bundle when nothing was sent for the
   subscription's `backport-heartbeat-period`. Events are the durable numbered rows: a client that
   reconnects binds again and replays what it missed with `$events` (the handshake tells it
   `events-since-subscription-start`). `full-resource` content is read acting as the
   subscription's author, as rest-hook delivery does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from fhir_facade.auth.access import Access, acting_as, current_access, on_server_authority
from fhir_facade.fhir.errors import FhirError, bad_request, error
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.store.authorship import WRITE_AUTHOR
from fhir_facade.subscriptions.backport import parse_subscription
from fhir_facade.subscriptions.binding_tokens import Binding, BindingTokens
from fhir_facade.subscriptions.channel_state import ChannelStates, heartbeat_due
from fhir_facade.subscriptions.delivery import event_notification
from fhir_facade.subscriptions.notification import notification_bundle
from fhir_facade.subscriptions.queue import SubscriptionQueue
from fhir_facade.subscriptions.topics import Topic

__all__ = ["GET_WS_BINDING_TOKEN", "SOCKET_PATH", "WebsocketChannel", "websocket_url"]

log = logging.getLogger(__name__)

#: CapabilityStatement.rest.resource.operation entry for Subscription.
GET_WS_BINDING_TOKEN = {
    "name": "get-ws-binding-token",
    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/"
    "backport-subscription-get-ws-binding-token",
}
#: The socket's path under the FHIR base.
SOCKET_PATH = "/subscriptions/ws"
BIND = "bind-with-token"
#: Close code for a refused binding (RFC 6455 7.4.1: policy violation).
POLICY_VIOLATION = 1008
_BATCH = 20
_BINDABLE = frozenset({"requested", "active", "error"})


def websocket_url(base_url: str) -> str:
    """The socket's URL as clients reach it: the FHIR base with the ws(s) scheme (ADR 0016: links
    name the public base)."""
    scheme, _, rest = base_url.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}{SOCKET_PATH}"


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WebsocketSettings:
    base_url: str
    poll_interval: float
    #: FACADE_AUTH=smart: a token must name the caller it was issued to.
    enforced: bool
    #: A socket with nothing bound for this long is closed (1008): a connection costs a task, and
    #: one that never binds must not hold it (the token's lifetime: a client binds within it).
    bind_timeout: float = 60.0


@dataclass
class _Bound:
    """One Subscription bound to one socket."""

    subscription_id: str
    #: The last event number sent on this socket.
    cursor: int
    last_sent: datetime


async def _requested_ids(request: Request) -> list[str]:
    """The type-level `id` parameters: repeated (or comma-separated) in the query, or `id` entries
    (valueId / valueString) of a Parameters body."""
    found = [part for value in request.query_params.getlist("id") for part in value.split(",")]
    if request.method == "POST" and await request.body():
        try:
            body = json.loads(await request.body())
        except ValueError as failure:
            raise bad_request("The body must be a FHIR Parameters resource") from failure
        parameters = body.get("parameter", []) if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or body.get("resourceType") != "Parameters"
            or not isinstance(parameters, list)
        ):
            raise bad_request("The body must be a FHIR Parameters resource")
        for parameter in parameters:
            if isinstance(parameter, dict) and parameter.get("name") == "id":
                found.append(str(parameter.get("valueId", parameter.get("valueString", ""))))
    return [i.strip() for i in found if i.strip()]


class WebsocketChannel:
    def __init__(
        self,
        readers: Mapping[str, ResourceProvider],
        queue: SubscriptionQueue,
        states: ChannelStates,
        tokens: BindingTokens,
        topics: dict[str, Topic],
        settings: WebsocketSettings,
    ) -> None:
        """`readers`: the pipelined providers (every read goes through the authorization stage)."""
        self.readers = readers
        self.subscriptions = readers["Subscription"]
        self.queue = queue
        self.states = states
        self.tokens = tokens
        self.topics = topics
        self.settings = settings
        self._sessions: set[_Session] = set()

    # -- $get-ws-binding-token ------------------------------------------------------------------

    def operation_router(self) -> APIRouter:
        """The operation's routes (instance and type level, GET and POST); the caller's bearer token
        applies (the app includes them with the authenticating dependency)."""
        router = APIRouter(prefix="/fhir")

        async def instance(subscription_id: str, request: Request) -> Response:
            negotiate_response_format(request)
            return fhir_response(await self._issue([subscription_id]), request)

        async def type_level(request: Request) -> Response:
            negotiate_response_format(request)
            ids = await _requested_ids(request)
            if not ids:
                raise bad_request(
                    "Name the Subscriptions to bind with one or more `id` parameters", expression="id"
                )
            return fhir_response(await self._issue(ids), request)

        summary = "Websocket binding token for Subscriptions (Backport IG $get-ws-binding-token)"
        for method in ("GET", "POST"):
            router.add_api_route(
                "/Subscription/$get-ws-binding-token",
                type_level,
                methods=[method],
                summary=summary,
                description=f"The token is sent as `{BIND} <token>` on the returned websocket-url.",
                operation_id=f"subscription_get_ws_binding_token_type_{method.lower()}",
                responses=error_responses(400, 404, 422),
            )
            router.add_api_route(
                "/Subscription/{subscription_id}/$get-ws-binding-token",
                instance,
                methods=[method],
                summary=summary,
                description=f"The token is sent as `{BIND} <token>` on the returned websocket-url.",
                operation_id=f"subscription_get_ws_binding_token_{method.lower()}",
                responses=error_responses(400, 404, 410, 422),
            )
        return router

    async def _issue(self, ids: list[str]) -> dict[str, Any]:
        unique = list(dict.fromkeys(ids))
        for subscription_id in unique:
            # Through the pipeline with the caller's token: another author's Subscription is a 404.
            resource = await self.subscriptions.read(subscription_id)
            spec = parse_subscription(resource, self.topics)
            if spec.channel != "websocket" or resource.get("status") not in _BINDABLE:
                raise error(
                    422,
                    "business-rule",
                    f"Subscription/{subscription_id} is not an active websocket subscription "
                    f"(channel.type {spec.channel}, status {resource.get('status')})",
                    detail_code="subscription_not_websocket",
                    expression=("id",),
                )
        access = current_access.get()
        principal = access.principal() if access is not None else None
        token, expires = await run_in_threadpool(self.tokens.issue, principal, tuple(unique))
        parameters: list[dict[str, Any]] = [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": _instant(expires)},
            *({"name": "subscription", "valueString": f"Subscription/{i}"} for i in unique),
            {"name": "websocket-url", "valueUrl": websocket_url(self.settings.base_url)},
        ]
        return {"resourceType": "Parameters", "parameter": parameters}

    # -- the socket -----------------------------------------------------------------------------

    def socket_router(self) -> APIRouter:
        """The websocket route. Included WITHOUT the bearer dependency: a browser cannot send one;
        the binding token is the credential (module docstring)."""
        router = APIRouter(prefix="/fhir")

        async def socket(websocket: WebSocket) -> None:
            await websocket.accept()
            session = _Session(self, websocket)
            self._sessions.add(session)
            try:
                await session.run()
            finally:
                self._sessions.discard(session)

        router.add_api_websocket_route(SOCKET_PATH, socket, name="subscription_websocket")
        return router

    async def close_all(self) -> None:
        """Close every socket (the app is stopping): 1001, going away."""
        for session in list(self._sessions):
            await session.close(1001, "server stopping")

    def access_for(self, binding: Binding) -> Access | None:
        """The rights the socket acts with: those of the caller the token was issued to."""
        if binding.principal is not None:
            return Access.from_principal(binding.principal)
        return None if self.settings.enforced else Access.unrestricted()

    async def read_as(self, access: Access, subscription_id: str) -> dict[str, Any] | None:
        try:
            with origin_scope(Origin.OPERATION), acting_as(access):
                return await self.subscriptions.read(subscription_id)
        except FhirError:
            return None

    async def activate(self, subscription_id: str, author: str | None) -> dict[str, Any] | None:
        """A socket binds a `requested` subscription: it becomes `active` (IG: the handshake sets
        it up), a version written by the server with the subscription's author kept, as
        delivery.py does for rest-hook. Returns the active version (None if not recorded)."""
        token = WRITE_AUTHOR.set(author)
        try:
            with origin_scope(Origin.INTERNAL), on_server_authority():
                current = await self.subscriptions.read(subscription_id)
                if current.get("status") != "requested":
                    return current
                written = await self.subscriptions.update(
                    subscription_id, {**current, "status": "active"}, if_match=None
                )
                return written.resource
        except FhirError as failure:
            log.warning("Subscription/%s: status active not recorded: %s", subscription_id, failure)
            return None
        finally:
            WRITE_AUTHOR.reset(token)


class _Session:
    """One socket: reads `bind-with-token` commands, sends handshakes, events and heartbeats."""

    def __init__(self, channel: WebsocketChannel, websocket: WebSocket) -> None:
        self._channel = channel
        self._socket = websocket
        self._bound: dict[str, _Bound] = {}
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive())
        idle_since = asyncio.get_running_loop().time()
        try:
            while not receiver.done() and not self._closed.is_set():
                now = asyncio.get_running_loop().time()
                if self._bound:
                    idle_since = now
                elif now - idle_since > self._channel.settings.bind_timeout:
                    await self.close(POLICY_VIOLATION, f"nothing bound: send '{BIND} <token>'")
                    break
                try:
                    await self._pump()
                except (WebSocketDisconnect, RuntimeError):
                    break  # the socket went away while sending
                except Exception:
                    log.exception("Websocket session failed")
                    await self.close(1011, "internal error")  # RFC 6455 7.4.1
                    break
                await asyncio.wait({receiver}, timeout=self._channel.settings.poll_interval)
        finally:
            receiver.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await receiver

    async def close(self, code: int, reason: str) -> None:
        self._closed.set()
        if self._socket.application_state != WebSocketState.DISCONNECTED:
            with suppress(Exception):
                await self._socket.close(code, reason)

    async def _send(self, bundle: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._socket.send_text(json.dumps(bundle, separators=(",", ":")))

    async def _receive(self) -> None:
        while True:
            message = await self._socket.receive()
            if message["type"] == "websocket.disconnect":
                self._closed.set()
                return
            text = message.get("text")
            if text is None:
                await self.close(1003, f"text messages only: '{BIND} <token>'")  # unsupported data
                return
            command, _, argument = text.strip().partition(" ")
            if command.rstrip(":") != BIND or not argument.strip():
                await self.close(POLICY_VIOLATION, f"expected '{BIND} <token>'")
                return
            if not await self._bind(argument.strip()):
                return

    async def _bind(self, token: str) -> bool:
        """Bind the token's Subscriptions; False (and the socket closed) when the token is refused."""
        channel = self._channel
        binding = await run_in_threadpool(channel.tokens.redeem, token)
        access = channel.access_for(binding) if binding is not None else None
        if binding is None or access is None:
            await self.close(POLICY_VIOLATION, "binding token unknown or expired")
            return False
        bound = 0
        for subscription_id in binding.subscriptions:
            resource = await channel.read_as(access, subscription_id)
            state = await run_in_threadpool(channel.states.get, subscription_id)
            if resource is None or state is None or resource.get("status") not in _BINDABLE:
                continue
            try:
                spec = parse_subscription(resource, channel.topics)
            except FhirError:
                continue
            if spec.channel != "websocket":
                continue
            # Events numbered after the state was read come on this socket; earlier ones by $events.
            # Active before the handshake goes out: once the client has it, its writes are events.
            if resource.get("status") == "requested":
                resource = await channel.activate(subscription_id, state.author) or resource
            self._bound[subscription_id] = _Bound(subscription_id, state.events_count, datetime.now(UTC))
            handshake = notification_bundle(
                channel.settings.base_url, resource, "handshake", state.events_count, [], spec.content
            )
            await self._send(handshake)
            await run_in_threadpool(channel.states.sent_on_socket, subscription_id, None)
            bound += 1
        if not bound:
            await self.close(POLICY_VIOLATION, "no subscription of this token can be bound")
            return False
        return True

    async def _pump(self) -> None:
        """Send each bound subscription's new events, or a heartbeat when one is due."""
        channel = self._channel
        for bound in list(self._bound.values()):
            state = await run_in_threadpool(channel.states.get, bound.subscription_id)
            if state is None or state.status not in _BINDABLE or state.channel != "websocket":
                del self._bound[bound.subscription_id]  # deleted, off, or no longer websocket
                continue
            try:
                spec = parse_subscription(state.resource, channel.topics)
            except FhirError:
                continue
            events = await run_in_threadpool(
                channel.queue.events, bound.subscription_id, bound.cursor, None, _BATCH
            )
            for event in events:
                notification = await event_notification(channel.readers, event, spec.content, state.author)
                await self._send(
                    notification_bundle(
                        channel.settings.base_url,
                        state.resource,
                        "event-notification",
                        max(state.events_count, event.event_number),
                        [notification],
                        spec.content,
                    )
                )
                bound.cursor = event.event_number
                bound.last_sent = datetime.now(UTC)
            if events:
                await run_in_threadpool(channel.states.sent_on_socket, bound.subscription_id, bound.cursor)
            elif heartbeat_due(bound.last_sent, spec.heartbeat_period, datetime.now(UTC)):
                await self._send(
                    notification_bundle(
                        channel.settings.base_url,
                        state.resource,
                        "heartbeat",
                        state.events_count,
                        [],
                        spec.content,
                    )
                )
                bound.last_sent = datetime.now(UTC)
                await run_in_threadpool(channel.states.sent_on_socket, bound.subscription_id, None)
