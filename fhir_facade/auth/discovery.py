"""SMART discovery: `/fhir/.well-known/smart-configuration` and CapabilityStatement.rest.security.

SMART App Launch 2.x (conformance.html) asks for a JSON document at `[base]/.well-known/smart-configuration`
naming the OAuth endpoints and the server's capabilities; older clients, the Python `fhirclient`
library among them, read the same URLs only from the CapabilityStatement's `oauth-uris` extension, so
both are served, from one `AuthorizationEndpoints` value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fhir_facade.config import Settings

__all__ = ["AuthorizationEndpoints", "build_discovery_router", "capability_security", "smart_configuration"]

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"

#: What the facade can do as a SMART resource server with the built-in authorization server.
_BUILTIN_CAPABILITIES = (
    "launch-standalone",
    "launch-ehr",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "context-standalone-patient",
    "context-ehr-patient",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "permission-online",
    "permission-offline",
)
_SCOPES_SUPPORTED = (
    "launch",
    "launch/patient",
    "fhirUser",
    "online_access",
    "offline_access",
    "patient/*.rs",
    "patient/*.cruds",
    "user/*.rs",
    "user/*.cruds",
    "system/*.rs",
    "system/*.cruds",
    "patient/*.read",
    "user/*.read",
    "system/*.read",
)


@dataclass(frozen=True)
class AuthorizationEndpoints:
    """The authorization server's URLs, as advertised to clients."""

    issuer: str
    token: str
    authorize: str | None = None
    jwks: str | None = None
    introspection: str | None = None
    revocation: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthorizationEndpoints:
        if settings.builtin_issuer:
            root = f"{settings.public_root}/auth"
            return cls(
                settings.token_issuer,
                f"{root}/token",
                f"{root}/authorize",
                f"{root}/jwks",
                revocation=f"{root}/revoke",
            )
        return cls(
            issuer=settings.token_issuer,
            token=settings.auth_token_url or f"{settings.token_issuer}/token",
            authorize=settings.auth_authorize_url,
            jwks=settings.auth_jwks_url,
            introspection=settings.auth_introspection_url,
        )


def smart_configuration(endpoints: AuthorizationEndpoints, *, builtin: bool) -> dict[str, Any]:
    """The `.well-known/smart-configuration` document (SMART App Launch 2.x conformance.html)."""
    document: dict[str, Any] = {
        "issuer": endpoints.issuer,
        "token_endpoint": endpoints.token,
        "token_endpoint_auth_methods_supported": [
            "private_key_jwt",
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "scopes_supported": list(_SCOPES_SUPPORTED),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": list(_BUILTIN_CAPABILITIES) if builtin else ["permission-v1", "permission-v2"],
    }
    if endpoints.authorize:
        document["authorization_endpoint"] = endpoints.authorize
    if endpoints.jwks:
        document["jwks_uri"] = endpoints.jwks
    if endpoints.introspection:
        document["introspection_endpoint"] = endpoints.introspection
    if endpoints.revocation:
        document["revocation_endpoint"] = endpoints.revocation
    return document


def capability_security(endpoints: AuthorizationEndpoints, *, cors: bool) -> dict[str, Any]:
    """CapabilityStatement.rest.security: the SMART-on-FHIR service and the `oauth-uris` extension."""
    uris = [{"url": "token", "valueUri": endpoints.token}]
    if endpoints.authorize:
        uris.insert(0, {"url": "authorize", "valueUri": endpoints.authorize})
    return {
        "extension": [{"url": OAUTH_URIS, "extension": uris}],
        "cors": cors,
        "service": [
            {
                "coding": [{"system": SECURITY_SERVICE, "code": "SMART-on-FHIR"}],
                "text": "OAuth 2.0 bearer tokens per SMART App Launch 2.x (scopes v1 and v2)",
            }
        ],
        "description": "Every interaction needs a bearer token whose SMART scopes grant it.",
    }


def build_discovery_router(endpoints: AuthorizationEndpoints, *, builtin: bool) -> APIRouter:
    """`GET /fhir/.well-known/smart-configuration`: public, as SMART requires."""
    router = APIRouter()
    document = smart_configuration(endpoints, builtin=builtin)

    @router.get(
        "/fhir/.well-known/smart-configuration",
        summary="SMART configuration (discovery)",
        tags=["authorization"],
        openapi_extra={"security": []},  # public: clients read it before they have a token
    )
    async def smart_config(request: Request) -> JSONResponse:
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=300"})

    return router
