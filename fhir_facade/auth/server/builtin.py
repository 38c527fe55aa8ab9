"""The built-in authorization server as one object: keys, registry, grants and the routes.

Used with FACADE_AUTH=smart and no FACADE_AUTH_ISSUER (``Settings.builtin_issuer``): the embedded,
single-process set-up. Codes, sign-in tickets and the assertion replay cache live in this process's
memory, so several replicas behind a load balancer need an external authorization server instead.
"""

from __future__ import annotations

from authlib.common.security import is_secure_transport
from fastapi import APIRouter, Request
from joserfc.jwk import KeySet
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from fhir_facade.auth.server.access_tokens import AccessTokenIssuer
from fhir_facade.auth.server.assertions import JtiReplayCache, SmartClientAssertion
from fhir_facade.auth.server.authorize import AuthorizationEndpoint
from fhir_facade.auth.server.codes import CodeStore
from fhir_facade.auth.server.oauth import SmartAuthorizationServer, StarletteOAuth2Request
from fhir_facade.auth.server.registry import Registry, load_or_create_registry
from fhir_facade.auth.server.signing_key import SigningKey
from fhir_facade.auth.server.tickets import SignInTickets
from fhir_facade.auth.server.users import UserDirectory
from fhir_facade.config import Settings

__all__ = ["SIGNING_KEY_FILE", "BuiltinAuthorizationServer"]

SIGNING_KEY_FILE = "auth-signing-key.json"


class BuiltinAuthorizationServer:
    """OAuth 2.0 / SMART authorization server at ``<public root>/auth``.

    Routes: GET+POST /auth/authorize (sign-in, authorization code with PKCE), POST /auth/token
    (authorization_code; client_credentials with private_key_jwt), GET /auth/jwks (the public key
    that verifies the access tokens).
    """

    router: APIRouter
    authorize_url: str
    token_url: str
    jwks_url: str

    def __init__(self, settings: Settings) -> None:
        root = settings.public_root
        if not is_secure_transport(root):
            raise ValueError(
                f"FACADE_BASE_URL {settings.base_url!r}: the built-in authorization server takes passwords "
                "and issues tokens, so it needs an https URL (or a loopback address for development)"
            )
        self.authorize_url = f"{root}/auth/authorize"
        self.token_url = f"{root}/auth/token"
        self.jwks_url = f"{root}/auth/jwks"
        self.signing_key = SigningKey.load_or_create(settings.data_dir / SIGNING_KEY_FILE)
        self.registry: Registry = load_or_create_registry(settings.resolved_clients_file)
        self.codes = CodeStore()
        self.replay_cache = JtiReplayCache()
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
        )
        self._authorization = AuthorizationEndpoint(
            self.oauth, self.registry, UserDirectory(self.registry), SignInTickets()
        )
        self.router = self._routes()

    def public_key_set(self) -> KeySet:
        """The public signing key(s): what /auth/jwks serves and the resource server trusts."""
        return self.signing_key.public_key_set()

    def _routes(self) -> APIRouter:
        router = APIRouter(prefix="/auth", tags=["authorization"])
        jwks = self.public_key_set().as_dict(private=False)

        @router.get("/authorize", include_in_schema=False)
        async def authorize_page(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.authorize_url)
            return await run_in_threadpool(self._authorization.show, oauth_request)

        @router.post("/authorize", include_in_schema=False)
        async def authorize_submit(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.authorize_url)
            return await run_in_threadpool(self._authorization.submit, oauth_request)

        @router.post("/token", summary="OAuth 2.0 token endpoint (RFC 6749 3.2)")
        async def token(request: Request) -> Response:
            oauth_request = await StarletteOAuth2Request.read(request, self.token_url)
            response: Response = await run_in_threadpool(self.oauth.create_token_response, oauth_request)
            return response

        @router.get("/jwks", summary="The public keys that sign access tokens (RFC 7517)")
        async def key_set() -> Response:
            return JSONResponse(jwks, headers={"Cache-Control": "public, max-age=300"})

        return router
