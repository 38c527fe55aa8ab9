"""The built-in authorization server as one object: keys, registry, grants and the routes.

Used with FACADE_AUTH=smart and no FACADE_AUTH_ISSUER (``Settings.builtin_issuer``). Codes, sign-in
tickets, launch contexts, refresh tokens (ADR 0047), the assertion replay cache and the brute-force
lockout counters
(``lockout``, ADR 0011) live in the store's expiring entries (``shared_state``, ADR 0032), so
replicas behind one load balancer act as one server; without a store (tests of the grant logic)
the in-memory counterparts are used.

Failed sign-ins and failed client authentications are logged and, with auditing on, recorded as
AuditEvents through the ``RefusalAudit`` the application hands in (``failure_report``); the answer to a
failure is held back by the lockout's growing delay with ``asyncio.sleep``, so no worker thread waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from functools import partial

from authlib.common.security import is_secure_transport
from fastapi import APIRouter, Request
from joserfc.jwk import KeySet
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from fhir_facade.auth.server.access_tokens import AccessTokenIssuer
from fhir_facade.auth.server.assertions import JtiReplayCache, SmartClientAssertion
from fhir_facade.auth.server.authorize import AuthorizationEndpoint
from fhir_facade.auth.server.codes import CodeStore
from fhir_facade.auth.server.ehr_launch import EhrLauncher
from fhir_facade.auth.server.failure_report import FailureReporter, RefusalAudit
from fhir_facade.auth.server.launches import LaunchContexts
from fhir_facade.auth.server.lockout import Attempt, lockouts_from_settings
from fhir_facade.auth.server.oauth import SmartAuthorizationServer, StarletteOAuth2Request
from fhir_facade.auth.server.openapi import (
    AUTHORIZE_GET,
    AUTHORIZE_POST,
    EHR_LAUNCH_GET,
    EHR_LAUNCH_POST,
    JWKS,
    REVOKE,
    TOKEN,
)
from fhir_facade.auth.server.refresh_tokens import MemoryEntries, RefreshTokens
from fhir_facade.auth.server.registry import ClientEntry, Registry, load_or_create_registry, with_clients
from fhir_facade.auth.server.shared_state import (
    SharedCodeStore,
    SharedJtiReplayCache,
    SharedLaunchContexts,
    SharedSignInTickets,
)
from fhir_facade.auth.server.signing_key import SigningKey
from fhir_facade.auth.server.tickets import SignInTickets
from fhir_facade.auth.server.users import UserDirectory
from fhir_facade.config import Settings
from fhir_facade.store.expiring import ExpiringEntries

__all__ = ["SIGNING_KEY_FILE", "BuiltinAuthorizationServer"]

SIGNING_KEY_FILE = "auth-signing-key.json"


class BuiltinAuthorizationServer:
    """OAuth 2.0 / SMART authorization server at ``<public root>/auth``.

    Routes: GET+POST /auth/authorize (sign-in, authorization code with PKCE), GET+POST
    /auth/ehr-launch (the EHR launcher, ADR 0042), POST /auth/token
    (authorization_code; client_credentials with private_key_jwt; refresh_token, ADR 0047), POST
    /auth/revoke (RFC 7009: a refresh token's family), GET /auth/jwks (the public key that verifies
    the access tokens). ``audit``: records AuditEvents (None when
    auditing is off), for the refused authentications. ``builtin_clients``: clients registered in
    memory beside the registry file's (``registry.with_clients``).
    """

    router: APIRouter
    authorize_url: str
    token_url: str
    jwks_url: str
    revocation_url: str

    def __init__(
        self,
        settings: Settings,
        *,
        audit: RefusalAudit | None = None,
        shared: ExpiringEntries | None = None,
        builtin_clients: Iterable[ClientEntry] = (),
    ) -> None:
        root = settings.public_root
        if not is_secure_transport(root):
            raise ValueError(
                f"FACADE_BASE_URL {settings.base_url!r}: the built-in authorization server takes passwords "
                "and issues tokens, so it needs an https URL (or a loopback address for development)"
            )
        self.authorize_url = f"{root}/auth/authorize"
        self.token_url = f"{root}/auth/token"
        self.jwks_url = f"{root}/auth/jwks"
        self.revocation_url = f"{root}/auth/revoke"
        self.signing_key = SigningKey.load_or_create(settings.data_dir / SIGNING_KEY_FILE)
        # builtin_clients: those the facade registers itself at every start (the SMART app, ADR 0043),
        # added in memory so that a registry file written earlier needs no edit.
        self.registry: Registry = with_clients(
            load_or_create_registry(settings.resolved_clients_file), builtin_clients
        )
        # With `shared` (the store's expiring entries, as the app passes them), codes, sign-in
        # tickets, seen jti values and the lockout counters are shared by every replica (ADR 0032).
        self.codes: CodeStore = SharedCodeStore(shared) if shared else CodeStore()
        self.replay_cache: JtiReplayCache = SharedJtiReplayCache(shared) if shared else JtiReplayCache()
        self.launches: LaunchContexts = SharedLaunchContexts(shared) if shared else LaunchContexts()
        self.refresh_tokens = RefreshTokens(
            shared if shared else MemoryEntries(),
            online_lifetime=settings.auth_refresh_token_lifetime,
            offline_lifetime=settings.auth_offline_refresh_token_lifetime,
        )
        self.oauth = SmartAuthorizationServer(
            registry=self.registry,
            codes=self.codes,
            issuer=AccessTokenIssuer(
                key=self.signing_key,
                issuer=settings.token_issuer,
                audience=settings.token_audience,
                lifetime=settings.auth_token_lifetime,
            ),
            assertion=SmartClientAssertion(self.token_url, replay_cache=self.replay_cache),
            fhir_base=settings.base_url,
            refresh_tokens=self.refresh_tokens,
            launches=self.launches,
        )
        self.sign_in_lockout, self.token_lockout = lockouts_from_settings(settings, shared)
        tickets = SharedSignInTickets(shared) if shared else SignInTickets()
        self._failures = FailureReporter(audit)
        users = UserDirectory(self.registry)
        self._authorization = AuthorizationEndpoint(
            self.oauth, self.registry, users, tickets, self.sign_in_lockout
        )
        self._launcher = EhrLauncher(
            registry=self.registry,
            users=users,
            tickets=tickets,
            lockout=self.sign_in_lockout,
            launches=self.launches,
            fhir_base=settings.base_url,
        )
        self.router = self._routes()

    def public_key_set(self) -> KeySet:
        """The public signing key(s): what /auth/jwks serves and the resource server trusts."""
        return self.signing_key.public_key_set()

    def _routes(self) -> APIRouter:
        router = APIRouter(prefix="/auth", tags=["authorization"])
        jwks = self.public_key_set().as_dict(private=False)

        @router.get("/authorize", openapi_extra=AUTHORIZE_GET, response_class=Response)
        async def authorize_page(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.authorize_url)
            return await run_in_threadpool(self._authorization.show, oauth_request)

        @router.post("/authorize", openapi_extra=AUTHORIZE_POST, response_class=Response)
        async def authorize_submit(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.authorize_url)
            response, attempt = await run_in_threadpool(
                self._authorization.submit, oauth_request, _address(request)
            )
            if attempt is not None:
                client_id = oauth_request.payload.client_id
                await self._failures.report(
                    "sign-in", attempt, client_id=client_id, reason="unknown username or wrong password"
                )
                await _hold_back(attempt)
            return response

        @router.get("/ehr-launch", openapi_extra=EHR_LAUNCH_GET, response_class=Response)
        async def ehr_launch_page() -> Response:
            return self._launcher.show()

        @router.post("/ehr-launch", openapi_extra=EHR_LAUNCH_POST, response_class=Response)
        async def ehr_launch_submit(request: Request) -> Response:
            async with request.form() as data:
                form = {name: value for name, value in data.items() if isinstance(value, str)}
            response, attempt = await run_in_threadpool(self._launcher.submit, form, _address(request))
            if attempt is not None:
                await self._failures.report(
                    "sign-in",
                    attempt,
                    client_id=form.get("client_id"),
                    reason="unknown username or wrong password",
                )
                await _hold_back(attempt)
            return response

        @router.post("/token", openapi_extra=TOKEN, response_class=Response)
        async def token(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.token_url)
            return await self._counted(request, oauth_request, self.oauth.create_token_response)

        @router.post("/revoke", openapi_extra=REVOKE, response_class=Response)
        async def revoke(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.revocation_url)
            return await self._counted(
                request,
                oauth_request,
                partial(self.oauth.create_endpoint_response, "revocation"),
                issues=False,
            )

        @router.get("/jwks", openapi_extra=JWKS, response_class=Response)
        async def key_set() -> Response:
            return JSONResponse(jwks, headers={"Cache-Control": "public, max-age=300"})

        return router

    async def _counted(
        self,
        request: Request,
        oauth_request: StarletteOAuth2Request,
        respond: Callable[[StarletteOAuth2Request], Response],
        *,
        issues: bool = True,
    ) -> Response:
        """Answer a token or revocation request under the token endpoint's lockout (ADR 0011):
        failures are counted, logged, audited and held back; a locked-out client or address is
        refused before anything is checked. ``issues``: a 200 is a success that resets the
        client's counter (tokens issued; not a revocation, which answers 200 to anything)."""
        # The counters live in the store (shared by replicas): every step runs in a worker thread.
        attempt = await run_in_threadpool(
            self.token_lockout.begin, oauth_request.claimed_client_id(), _address(request)
        )
        if attempt.retry_after is not None:
            response = _locked_out_token_response(attempt.retry_after)
        else:
            try:
                response = await run_in_threadpool(respond, oauth_request)
            except BaseException:
                await run_in_threadpool(attempt.close)
                raise
            await run_in_threadpool(
                _judge, attempt, oauth_request.refused_with, issued=issues and response.status_code == 200
            )
        reason = f"{oauth_request.refused_with}: {oauth_request.refusal_description or 'no description'}"
        await self._failures.report("token", attempt, client_id=None, reason=reason)
        await _hold_back(attempt)
        return response


def _address(request: Request) -> str:
    """The client's network address (behind a proxy, what uvicorn took from X-Forwarded-For for a
    trusted proxy: FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else ""


def _judge(attempt: Attempt, error: str | None, *, issued: bool) -> None:
    """Count a token request's outcome: ``invalid_client`` (client authentication failed) against the
    client_id and the address; ``invalid_grant`` (a wrong, used or expired code or verifier) against
    the address only, since anyone can send a public client's id with a bad code and codes are not
    guessable; any other error (scope, grant type, malformed request) is no credential failure."""
    if error == "invalid_client":
        attempt.failed()
    elif error == "invalid_grant":
        attempt.failed(principal=False)
    elif error is None and issued:
        attempt.succeeded()
    attempt.close()


async def _hold_back(attempt: Attempt) -> None:
    """The growing delay before answering a failure (none once a lockout has started)."""
    if attempt.outcome == "failed" and attempt.delay > 0:
        await asyncio.sleep(attempt.delay)


def _locked_out_token_response(retry_after: int) -> Response:
    """RFC 6749 5.2 error body with 429 Too Many Requests and Retry-After (RFC 6585 4): the client is
    not authenticated while its client_id or address is locked out (ADR 0011 explains the code)."""
    body = {
        "error": "invalid_client",
        "error_description": (
            "too many failed attempts for this client or from this address; "
            f"retry after {retry_after} seconds"
        ),
    }
    return Response(
        json.dumps(body),
        status_code=429,
        media_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache", "Retry-After": str(retry_after)},
    )
