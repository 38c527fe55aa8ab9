"""The authenticating dependency: bearer token -> Access, once per request (RFC 6750).

Every FHIR, DICOMweb and operation route depends on an ``Authenticator``; discovery, the
CapabilityStatement and the token endpoints do not (clients need them before they have a token).
Failures are typed FhirErrors, so the one error handler answers 401 with a `WWW-Authenticate: Bearer`
challenge and an OperationOutcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from starlette.concurrency import run_in_threadpool

from fhir_facade.auth.access import Access, enter_access
from fhir_facade.auth.errors import unauthorized
from fhir_facade.auth.scopes import InvalidScope, parse_scopes
from fhir_facade.auth.tokens import (
    BearerValidator,
    IntrospectionValidator,
    InvalidToken,
    JwksCache,
    KeySource,
    TokenValidator,
)
from fhir_facade.config import Settings

__all__ = ["Authenticator", "BearerScheme", "UserCompartments", "bearer_validator"]

#: The patients a user's `user/` scopes reach, by the token's `sub`; None: every patient.
UserCompartments = Callable[[str | None], frozenset[str] | None]

log = logging.getLogger(__name__)


def bearer_validator(settings: Settings, builtin_keys: KeySource | None) -> BearerValidator:
    """The validator FACADE_AUTH=smart uses: the built-in server's keys, or the external issuer's JWKS
    and/or RFC 7662 introspection."""
    keys: KeySource | None = builtin_keys
    if keys is None and settings.auth_jwks_url:
        keys = JwksCache(settings.auth_jwks_url)
    jwt_validator = (
        TokenValidator(issuer=settings.token_issuer, audience=settings.token_audience, keys=keys)
        if keys is not None
        else None
    )
    introspection = (
        IntrospectionValidator(
            url=settings.auth_introspection_url,
            client_id=settings.auth_introspection_client_id,
            client_secret=settings.auth_introspection_client_secret,
            issuer=settings.token_issuer,
            audience=settings.token_audience,
        )
        if settings.auth_introspection_url
        else None
    )
    if jwt_validator is None and introspection is None:
        raise ValueError(
            "FACADE_AUTH=smart with an external FACADE_AUTH_ISSUER needs FACADE_AUTH_JWKS_URL "
            "and/or FACADE_AUTH_INTROSPECTION_URL"
        )
    return BearerValidator(jwt_validator, introspection)


class Authenticator:
    """Resolve the caller of a request; with FACADE_AUTH=none everyone is trusted."""

    def __init__(
        self,
        validator: BearerValidator | None,
        *,
        blocking: bool = True,
        user_compartments: UserCompartments | None = None,
    ) -> None:
        self._validator = validator
        # Key fetches and introspection do network I/O; with in-process keys nothing blocks.
        self._blocking = blocking
        # The built-in server's registry: a user/ grant reaches that user's patients only. Without it
        # (an external issuer) user/ grants are taken as the issuer granted them (ADR 0009).
        self._user_compartments = user_compartments

    async def __call__(self, request: Request) -> Access:
        access = Access.unrestricted() if self._validator is None else await self._authenticate(request)
        request.state.access = access
        enter_access(access)
        return access

    async def _authenticate(self, request: Request) -> Access:
        assert self._validator is not None
        header = request.headers.get("authorization")
        if not header:
            raise unauthorized("This server requires a bearer token (Authorization: Bearer ...)")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise unauthorized(
                "The Authorization header is not 'Bearer <token>'", token_error="invalid_request"
            )
        try:
            if self._blocking:
                claims = await run_in_threadpool(self._validator.validate, token)
            else:
                claims = self._validator.validate(token)
        except InvalidToken as exc:
            log.info("Refused a bearer token on %s %s: %s", request.method, request.url.path, exc)
            raise unauthorized(f"The access token is not valid: {exc}", token_error="invalid_token") from exc
        try:
            scopes = parse_scopes(claims.scope)
        except InvalidScope as exc:
            raise unauthorized(
                f"The access token's scope is not valid: {exc}", token_error="invalid_token"
            ) from exc
        return Access(
            scopes,
            client_id=claims.client_id,
            subject=claims.subject,
            fhir_user=claims.fhir_user,
            patient=claims.patient,
            token_id=claims.token_id,
            user_patients=(
                self._user_compartments(claims.subject) if self._user_compartments is not None else None
            ),
        )


class BearerScheme(SecurityBase):
    """An `Authenticator` as a FastAPI security dependency: the same call, and every operation behind
    it carries an HTTP bearer security requirement (RFC 6750) in the OpenAPI document, from which
    `fhir_facade.fhir.openapi` declares its 401 and 403 answers and Swagger UI offers "Authorize".
    Used with FACADE_AUTH=smart only: with auth off no operation needs a token."""

    def __init__(self, authenticator: Authenticator, *, token_url: str) -> None:
        self.model = HTTPBearerModel(
            description=f"A SMART on FHIR access token, e.g. from {token_url} (SMART App Launch 2.x)"
        )
        self.scheme_name = "SMART"
        self.authenticator = authenticator

    async def __call__(self, request: Request) -> Access:
        return await self.authenticator(request)
