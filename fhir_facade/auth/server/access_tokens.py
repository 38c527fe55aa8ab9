"""Access tokens of the built-in authorization server: short-lived JWTs (RFC 9068 profile) that the
facade's own resource server validates like any external issuer's (``auth.tokens.TokenValidator``).

Claims: ``iss`` (FACADE's token issuer), ``aud`` (the FHIR base), ``sub`` (the user, or the client for
backend services), ``client_id``, ``scope`` (the granted scopes), ``patient`` (launch context),
``fhirUser`` (when granted and known), ``iat``/``nbf``/``exp`` and a random ``jti`` for audit.
Nothing is stored: a token cannot be revoked, which is why it lives five minutes at most (apps
granted ``online_access`` renew it with a refresh token, ADR 0047).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from joserfc import jwt

from fhir_facade.auth.server.signing_key import SigningKey
from fhir_facade.auth.server.users import ResourceOwner

__all__ = ["AccessTokenIssuer"]


class AccessTokenIssuer:
    """Signs access tokens and builds RFC 6749 5.1 token responses; authlib's token generator."""

    def __init__(
        self,
        *,
        key: SigningKey,
        issuer: str,
        audience: str,
        lifetime: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < lifetime <= 300:
            raise ValueError(f"lifetime must be 1..300 seconds, not {lifetime}")
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._lifetime = lifetime
        self._clock = clock

    def sign(self, *, client_id: str, subject: str, scope: str, owner: ResourceOwner | None) -> str:
        """A signed access token for these grants."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "nbf": now,
            "exp": now + self._lifetime,
            "jti": uuid.uuid4().hex,
        }
        granted = scope.split()
        if owner is not None:
            if owner.patient is not None:
                claims["patient"] = owner.patient
            if owner.encounter is not None:
                claims["encounter"] = owner.encounter
            if owner.fhir_user is not None and "fhirUser" in granted:
                claims["fhirUser"] = owner.fhir_user
        header = {"alg": self._key.algorithm, "kid": self._key.kid, "typ": "at+jwt"}
        return jwt.encode(header, claims, self._key.key, algorithms=[self._key.algorithm])

    def __call__(
        self,
        grant_type: str,
        client: Any,
        user: ResourceOwner | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """authlib's token generator interface: the token response body (RFC 6749 5.1). No refresh
        token, whatever ``include_refresh_token`` says: the grants add one (``refresh_tokens``, ADR
        0047). SMART launch context (``patient``) is added to the response, where apps read it."""
        client_id = client.get_client_id()
        granted = scope or ""
        token = self.sign(
            client_id=client_id,
            subject=user.username if user is not None else client_id,
            scope=granted,
            owner=user,
        )
        response: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self._lifetime,
            "scope": granted,
        }
        if user is not None and user.patient is not None:
            response["patient"] = user.patient
        if user is not None and user.encounter is not None:
            response["encounter"] = user.encounter
        return response
