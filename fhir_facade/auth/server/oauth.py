"""authlib's ``AuthorizationServer`` for Starlette: requests in, responses out, and the registry,
stores and token issuer it needs.

authlib ships server integrations for Flask and Django only. Its server is synchronous, so the
Starlette request is read first (``StarletteOAuth2Request.read``: the body needs ``await``) and the
snapshot is then handed to authlib in a worker thread by the routes.

authlib sees our *public* endpoint URLs (FACADE_BASE_URL), not the URL the request arrived on:
behind a TLS-terminating proxy the latter is plain http on an internal host, and authlib refuses
non-https URLs other than loopback (RFC 6749 3.1/3.2 require TLS).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    UnsupportedResponseTypeError,
)
from authlib.oauth2.rfc6749.util import extract_basic_authorization
from joserfc import jws
from joserfc.errors import JoseError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from fhir_facade.auth.scopes import InvalidScope, parse_scopes
from fhir_facade.auth.server.access_tokens import AccessTokenIssuer
from fhir_facade.auth.server.assertions import SmartClientAssertion
from fhir_facade.auth.server.clients import PRIVATE_KEY_JWT, RegisteredClient
from fhir_facade.auth.server.codes import CodeStore
from fhir_facade.auth.server.errors import safe_description
from fhir_facade.auth.server.grants import (
    S256CodeChallenge,
    SmartAuthorizationCodeGrant,
    SmartClientCredentialsGrant,
    SmartRefreshTokenGrant,
)
from fhir_facade.auth.server.launches import LaunchContexts
from fhir_facade.auth.server.refresh_tokens import RefreshTokens
from fhir_facade.auth.server.registry import Registry
from fhir_facade.auth.server.revocation import SmartRevocationEndpoint

__all__ = ["SmartAuthorizationServer", "StarletteOAuth2Request"]


class _Payload(OAuth2Payload):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._datalist: dict[str, list[str]] = {}
        for name, value in pairs:
            self._datalist.setdefault(name, []).append(value)
        self._data = {name: values[0] for name, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return self._datalist


class StarletteOAuth2Request(OAuth2Request):
    """A read-in Starlette request: query parameters for GET, form fields for POST."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers,
        query: Sequence[tuple[str, str]],
        form: Sequence[tuple[str, str]],
    ) -> None:
        super().__init__(method, uri, headers=headers)
        self._args = _Payload(query)
        self._form = _Payload(form)
        self.payload = self._args if method == "GET" else self._form
        #: The RFC 6749 error code this request was answered with, if any, and its description
        #: (``handle_error_response``): what the token endpoint's lockout counts and logs.
        self.refused_with: str | None = None
        self.refusal_description: str | None = None

    @property
    def args(self) -> dict[str, str]:
        return self._args.data

    @property
    def form(self) -> dict[str, str]:
        return self._form.data

    def claimed_client_id(self) -> str:
        """The client_id this token request claims, before anything is verified: the ``client_id``
        parameter, else the HTTP Basic user name (RFC 6749 2.3.1), else the ``sub`` of the client
        assertion (RFC 7523 3, read without checking its signature). What failures are counted
        against; "" when the request names no client."""
        sent = self.form.get("client_id")
        if sent:
            return sent
        basic_user, _ = extract_basic_authorization(self.headers)
        if basic_user:
            return str(basic_user)
        assertion = self.form.get("client_assertion", "")
        try:
            claims = json.loads(jws.extract_compact(assertion.encode("ascii")).payload)
        except (JoseError, ValueError, RecursionError):  # ValueError covers UnicodeError
            return ""  # not a readable assertion (a nested one blows the stack): names no client
        subject = claims.get("sub") if isinstance(claims, dict) else None
        return subject if isinstance(subject, str) else ""

    @classmethod
    async def read(cls, request: Request, public_url: str) -> StarletteOAuth2Request:
        """Snapshot ``request`` (reading its form body) as if it had arrived at ``public_url``."""
        query = list(request.query_params.multi_items())
        form: list[tuple[str, str]] = []
        if request.method == "POST":
            async with request.form() as data:
                form = [(name, value) for name, value in data.multi_items() if isinstance(value, str)]
        uri = f"{public_url}?{request.url.query}" if request.url.query else public_url
        return cls(request.method, uri, request.headers, query, form)


class SmartAuthorizationServer(AuthorizationServer):
    """The grants, client authentication and token generator of the built-in server, wired together."""

    def __init__(
        self,
        *,
        registry: Registry,
        codes: CodeStore,
        issuer: AccessTokenIssuer,
        assertion: SmartClientAssertion,
        fhir_base: str,
        refresh_tokens: RefreshTokens,
        launches: LaunchContexts | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self._clients = {entry.client_id: RegisteredClient(entry) for entry in registry.clients}
        self.codes = codes
        self.refresh_tokens = refresh_tokens
        self.launches = launches if launches is not None else LaunchContexts()
        self.fhir_base = fhir_base
        self.register_grant(SmartAuthorizationCodeGrant, [S256CodeChallenge(required=True)])
        self.register_grant(SmartClientCredentialsGrant)
        self.register_grant(SmartRefreshTokenGrant)
        self.register_endpoint(SmartRevocationEndpoint)
        self.register_client_auth_method(PRIVATE_KEY_JWT, assertion)
        self.register_token_generator("default", issuer)

    def query_client(self, client_id: str) -> RegisteredClient | None:
        return self._clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Nothing to save: access tokens are self-contained JWTs; the grants store refresh tokens
        themselves (``refresh_tokens``)."""

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal system here; authlib calls this after client authentication."""

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if not isinstance(request, StarletteOAuth2Request):
            raise TypeError("pass a StarletteOAuth2Request (read the Starlette request first)")
        return request

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("no JSON endpoints (dynamic registration, ...) on this server")

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        if isinstance(body, dict):
            body = json.dumps(body)
        return Response(content=body or b"", status_code=status, headers=dict(headers))

    def handle_error_response(self, request: Any, error: OAuth2Error) -> Response:
        if isinstance(request, StarletteOAuth2Request):
            request.refused_with = str(error.error)
            request.refusal_description = error.description or None
        response: Response = super().handle_error_response(request, error)
        return response

    def validate_requested_scope(self, scope: str | None) -> None:
        """SMART requires ``scope``; every resource scope in it must be well formed (scopes.parse_scopes)."""
        if not scope or not scope.split():
            raise InvalidScopeError(description="scope is required")
        try:
            parse_scopes(scope)
        except InvalidScope as exc:
            raise InvalidScopeError(description=safe_description(str(exc))) from None

    def get_authorization_grant(self, request: OAuth2Request) -> Any:
        # authlib's own error quotes the response_type into error_description, which must stay in
        # RFC 6749's character set; answer it here with a clean description instead.
        if request.payload.response_type != "code":
            client = self.query_client(request.payload.client_id or "")
            redirect_uri = request.payload.redirect_uri
            valid_redirect = client is not None and redirect_uri and client.check_redirect_uri(redirect_uri)
            raise UnsupportedResponseTypeError(
                request.payload.response_type,
                description="response_type must be code",
                redirect_uri=redirect_uri if valid_redirect else None,
            )
        return super().get_authorization_grant(request)

    def create_token_response(self, request: Any = None) -> Response:
        """RFC 6749 3.2: parameters sent more than once make the request invalid."""
        oauth_request = self.create_oauth2_request(request)
        repeated = sorted(name for name, values in oauth_request.payload.datalist.items() if len(values) > 1)
        if repeated:
            message = f"parameters sent more than once: {', '.join(repeated)}"
            error = InvalidRequestError(safe_description(message))
            response: Response = self.handle_error_response(oauth_request, error)
            return response
        result: Response = super().create_token_response(oauth_request)
        return result
