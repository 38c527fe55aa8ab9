"""Registered clients as authlib sees them (``ClientMixin``): which flows, secrets, redirect URIs
and scopes each kind of client is allowed."""

from __future__ import annotations

from authlib.oauth2.rfc6749 import ClientMixin, InvalidScopeError

from fhir_facade.auth.scopes import InvalidScope
from fhir_facade.auth.server.errors import safe_description
from fhir_facade.auth.server.passwords import verify_secret
from fhir_facade.auth.server.refresh_tokens import refresh_scope
from fhir_facade.auth.server.registry import ClientEntry
from fhir_facade.auth.server.scope_grants import narrow_scopes

__all__ = ["PRIVATE_KEY_JWT", "RegisteredClient"]

#: The token endpoint auth method of SMART Backend Services (RFC 7523 2.2, OIDC Core 9 naming).
PRIVATE_KEY_JWT = "private_key_jwt"

_TOKEN_AUTH_METHODS = {
    "public": frozenset({"none"}),
    "confidential": frozenset({"client_secret_basic", "client_secret_post"}),
    "backend-service": frozenset({PRIVATE_KEY_JWT}),
}


class RegisteredClient(ClientMixin):
    """One registry entry, answering authlib's questions about it."""

    def __init__(self, entry: ClientEntry) -> None:
        self.entry = entry
        self.client_id = entry.client_id

    def get_client_id(self) -> str:
        return self.entry.client_id

    def get_default_redirect_uri(self) -> str | None:
        # SMART App Launch makes redirect_uri REQUIRED: never fill it in from the registration.
        return None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Exact string match against a registered URI (OAuth 2.0 Security BCP 4.1.3)."""
        return redirect_uri in self.entry.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        encoded = self.entry.client_secret_hash
        return encoded is not None and verify_secret(client_secret, encoded)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if endpoint not in ("token", "revocation"):
            return True
        return method in _TOKEN_AUTH_METHODS[self.entry.kind]

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and not self.entry.backend

    def check_grant_type(self, grant_type: str) -> bool:
        if self.entry.backend:
            return grant_type == "client_credentials"
        if grant_type == "refresh_token":  # only apps registered for online_access/offline_access
            return refresh_scope(self.entry.scope) is not None
        return grant_type == "authorization_code"

    def get_allowed_scope(self, scope: str | None, *, ehr_launch: bool = True) -> str:
        """The requested scope narrowed to the registration (``scope_grants``), space separated.

        ``ehr_launch`` defaults to the wider narrowing because authlib calls this before the request's
        ``launch`` has been checked; ``SmartAuthorizationCodeGrant`` always narrows again with the real
        value once it has (ADR 0042). Backend services are not affected.

        Raises InvalidScopeError when the request is malformed or nothing of it may be granted: a token
        without any resource scope would be useless at the FHIR endpoint.
        """
        try:
            granted = narrow_scopes(
                scope or "", self.entry.scope, backend=self.entry.backend, ehr_launch=ehr_launch
            )
        except InvalidScope as exc:
            raise InvalidScopeError(description=safe_description(str(exc))) from None
        if not granted.resources:
            raise InvalidScopeError(
                description=safe_description(
                    f"none of the requested resource scopes is allowed for client {self.client_id!r}; "
                    f"it is registered for {self.entry.scope!r}"
                )
            )
        return " ".join([s.text for s in granted.resources] + list(granted.other))
