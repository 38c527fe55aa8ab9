"""The OAuth 2.0 grants the server offers, as authlib grant classes with SMART's rules.

- ``SmartAuthorizationCodeGrant``: authorization code (RFC 6749 4.1) for public and confidential
  apps, with PKCE S256 required (``S256CodeChallenge``) and SMART's ``aud`` and ``state``
  required at the authorization endpoint. Codes live in the server's ``CodeStore``.
- ``SmartClientCredentialsGrant``: client_credentials (RFC 6749 4.4) for SMART Backend Services,
  authenticated only by ``private_key_jwt`` (``assertions``), granted ``system/`` scopes only.

- ``SmartRefreshTokenGrant``: refresh_token (RFC 6749 6) for apps granted ``online_access`` or
  ``offline_access``, with rotation and replay detection (``refresh_tokens``, ADR 0047). The
  authorization code grant hands out the first refresh token of a family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from authlib.oauth2.rfc6749 import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, ClientCredentialsGrant, RefreshTokenGrant
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7636.challenge import CODE_CHALLENGE_PATTERN, compare_s256_code_challenge

from fhir_facade.auth.scopes import InvalidScope
from fhir_facade.auth.server.clients import PRIVATE_KEY_JWT, RegisteredClient
from fhir_facade.auth.server.codes import AuthorizationCode
from fhir_facade.auth.server.errors import safe_description
from fhir_facade.auth.server.refresh_tokens import RefreshGrant, RefreshTokenRefused, refresh_scope
from fhir_facade.auth.server.scope_grants import EHR_LAUNCH, covers
from fhir_facade.auth.server.users import ResourceOwner

if TYPE_CHECKING:
    from fhir_facade.auth.server.oauth import SmartAuthorizationServer

__all__ = [
    "S256CodeChallenge",
    "SmartAuthorizationCodeGrant",
    "SmartClientCredentialsGrant",
    "SmartRefreshTokenGrant",
]


class S256CodeChallenge(CodeChallenge):
    """PKCE (RFC 7636) as SMART App Launch 2.x requires it: always, and S256 only.

    authlib's ``CodeChallenge`` lets a request without ``code_challenge`` through and defaults a
    missing method to ``plain``; both are refused here, so every code carries an S256 challenge and
    every redemption needs the verifier (public and confidential clients alike).
    """

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]
    CODE_CHALLENGE_METHODS: ClassVar[dict[str, Callable[[str, str], bool]]] = {
        "S256": compare_s256_code_challenge
    }

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        payload = grant.request.payload
        challenge = payload.data.get("code_challenge")
        method = payload.data.get("code_challenge_method")
        for name in ("code_challenge", "code_challenge_method"):
            if len(payload.datalist.get(name, [])) > 1:
                raise InvalidRequestError(f"Multiple '{name}' in request.")
        if not challenge:
            raise InvalidRequestError("PKCE is required: send code_challenge and code_challenge_method=S256")
        if method != "S256":
            raise InvalidRequestError("code_challenge_method must be S256 (plain is not accepted)")
        if not CODE_CHALLENGE_PATTERN.match(challenge):
            raise InvalidRequestError("code_challenge must be 43-128 characters of [A-Za-z0-9-._~]")


class SmartAuthorizationCodeGrant(AuthorizationCodeGrant):
    """Authorization code grant for SMART standalone and EHR launch."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post", "none"]
    server: SmartAuthorizationServer
    #: The launch value this grant (one per authorization request) found live, if any.
    _checked_launch: str | None = None

    @staticmethod
    def validate_authorization_redirect_uri(request: OAuth2Request, client: RegisteredClient) -> str:
        """The redirect_uri must be sent and equal a registered one; errors here are never redirected."""
        redirect_uri = request.payload.redirect_uri
        if not redirect_uri:
            raise InvalidRequestError("redirect_uri is required", state=request.payload.state)
        if not client.check_redirect_uri(redirect_uri):
            message = f"redirect_uri {redirect_uri} is not registered for client {client.client_id}"
            raise InvalidRequestError(safe_description(message))
        return str(redirect_uri)

    def validate_authorization_request(self) -> str:
        redirect_uri = str(super().validate_authorization_request())
        try:
            self._validate_smart_parameters()
        except (InvalidRequestError, InvalidScopeError) as error:
            error.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def _validate_smart_parameters(self) -> None:
        """SMART App Launch 2.x, app-launch.html#obtain-authorization-code: ``aud`` and ``state`` are
        required; ``aud`` must be our FHIR base, so a token meant for us is never handed to an app that
        asked on behalf of another server (and vice versa)."""
        data = self.request.payload.data
        aud = data.get("aud")
        if not aud:
            raise InvalidRequestError("aud is required: the FHIR base URL the token is for")
        if aud.rstrip("/") != self.server.fhir_base.rstrip("/"):
            raise InvalidRequestError(
                safe_description(f"aud {aud} is not this server's FHIR base {self.server.fhir_base}")
            )
        if not data.get("state"):
            raise InvalidRequestError("state is required")
        launch = data.get("launch")
        if launch:
            self._validate_ehr_launch(str(launch))
        # authlib narrowed the scope as for an EHR launch (clients.RegisteredClient.get_allowed_scope);
        # narrow it again now that we know whether this is one.
        requested = str(self.request.payload.scope or "")
        scope = self.request.client.get_allowed_scope(requested, ehr_launch=bool(launch))
        if launch and EHR_LAUNCH not in scope.split():
            client_id = self.request.client.get_client_id()
            raise InvalidScopeError(
                description=safe_description(f"client {client_id} is not registered for the launch scope")
            )
        self.request.scope = scope

    def _validate_ehr_launch(self, launch: str) -> None:
        """SMART App Launch 2.x, app-launch.html#obtain-authorization-code (EHR launch): ``launch`` must
        be a live launch context created for this client (else ``invalid_request``, sent back to the
        app), and the app must ask for the ``launch`` scope: a ``launch`` without it is refused, not
        ignored, so a mistake shows at once (ADR 0042). A client not registered for ``launch`` gets
        ``invalid_scope``.

        authlib validates the request again when it issues the code, after the authorization endpoint
        has taken (used up) the launch; a launch this grant has already checked is not looked up twice.
        """
        if launch != self._checked_launch:
            if self.server.launches.find(launch, self.request.client.get_client_id()) is None:
                raise InvalidRequestError("launch is unknown, expired or was not created for this client")
            self._checked_launch = launch
        if EHR_LAUNCH not in str(self.request.payload.scope or "").split():
            raise InvalidRequestError("an EHR launch must ask for the launch scope")

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        owner = request.user
        assert isinstance(owner, ResourceOwner)
        data = request.payload.data
        self.server.codes.add(
            AuthorizationCode(
                code=code,
                client_id=request.client.get_client_id(),
                redirect_uri=str(request.payload.redirect_uri),
                scope=str(request.scope),
                owner=owner,
                code_challenge=str(data["code_challenge"]),
                code_challenge_method=str(data["code_challenge_method"]),
                expires_at=self.server.codes.expiry(),
            )
        )

    def query_authorization_code(self, code: str, client: RegisteredClient) -> AuthorizationCode | None:
        return self.server.codes.take(code, client.get_client_id())

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: ``query_authorization_code`` already took the code out of the store."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> ResourceOwner:
        return authorization_code.owner

    def save_token(self, token: dict[str, Any]) -> None:
        """Start a refresh token family when the grant carries ``online_access``/``offline_access``
        and the client is registered for refresh (SMART App Launch 2.x scopes-and-launch-context
        "Scopes for requesting a refresh token")."""
        client = self.request.client
        scope = str(token.get("scope") or "")
        if refresh_scope(scope) is not None and client.check_grant_type("refresh_token"):
            owner = self.request.user
            assert isinstance(owner, ResourceOwner)
            token["refresh_token"] = self.server.refresh_tokens.issue(
                client_id=client.get_client_id(), owner=owner, scope=scope
            )
        super().save_token(token)


class SmartRefreshTokenGrant(RefreshTokenGrant):
    """refresh_token with rotation: each redemption uses the token up and returns its successor;
    a used token presented again revokes its family (RFC 9700 4.14.2). Public clients send their
    client_id only (RFC 6749 2.3.1, 6); confidential ones authenticate as at the code exchange."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post", "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True
    server: SmartAuthorizationServer

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshGrant | None:
        try:
            return self.server.refresh_tokens.find(refresh_token)
        except RefreshTokenRefused as refused:
            raise InvalidGrantError(str(refused)) from None

    def _validate_request_token(self, client: RegisteredClient) -> RefreshGrant:
        refresh_token = self.request.form.get("refresh_token")
        if not refresh_token:
            raise InvalidRequestError("refresh_token is required")
        grant = self.authenticate_refresh_token(refresh_token)
        if grant is None or not grant.check_client(client):
            raise InvalidGrantError("refresh token was issued to another client")
        return grant

    def _validate_token_scope(self, token: RefreshGrant) -> None:
        """The requested scope may narrow the grant, never widen it (RFC 6749 6); resource scopes
        compare by meaning (``scope_grants.covers``)."""
        scope = self.request.payload.scope
        if not scope:
            return
        try:
            inside = covers(token.scope, str(scope))
        except InvalidScope as exc:
            raise InvalidScopeError(description=safe_description(str(exc))) from None
        if not inside:
            raise InvalidScopeError(
                description="the requested scope is not inside the one originally granted"
            )

    def authenticate_user(self, refresh_token: RefreshGrant) -> ResourceOwner | None:
        """The grant's user, while the registry still knows them (removed users refresh no more)."""
        owner = refresh_token.owner
        return owner if self.server.registry.user(owner.username) is not None else None

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        grant = self.request.refresh_token
        assert isinstance(grant, RefreshGrant)
        user = self.authenticate_user(grant)
        if user is None:
            raise InvalidGrantError("the user of this refresh token is no longer registered")
        try:  # the claim: of two concurrent redemptions, one gets here second and is a replay
            successor = self.server.refresh_tokens.rotate(grant)
        except RefreshTokenRefused as refused:
            raise InvalidGrantError(str(refused)) from None
        scope = str(self.request.payload.scope or grant.scope)
        token = self.generate_token(user=user, scope=scope, include_refresh_token=False)
        token["refresh_token"] = successor
        self.request.user = user
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def revoke_old_credential(self, refresh_token: RefreshGrant) -> None:
        """Nothing to do: ``rotate`` used the old token up."""


class SmartClientCredentialsGrant(ClientCredentialsGrant):
    """client_credentials for SMART Backend Services."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [PRIVATE_KEY_JWT]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        # authlib issues the requested scope as is; narrow it to the client's registration.
        self.request.scope = self.request.client.get_allowed_scope(self.request.payload.scope)

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token = self.generate_token(scope=self.request.scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER
