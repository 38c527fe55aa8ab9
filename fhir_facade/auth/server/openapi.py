"""What the built-in authorization server's routes declare in the OpenAPI document: their
parameters and their answers, success and error, as RFC 6749 and SMART App Launch 2.x give them.

The token endpoint answers errors as JSON (RFC 6749 5.2), the authorization endpoint as HTML pages
or as a redirect to the app (RFC 6749 4.1.2.1), never as OperationOutcomes; the limits and the
unexpected-failure answers every route shares are added by fhir_facade.fhir.openapi.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AUTHORIZE_GET",
    "AUTHORIZE_POST",
    "EHR_LAUNCH_GET",
    "EHR_LAUNCH_POST",
    "JWKS",
    "REVOKE",
    "TOKEN",
]

_HTML = {"text/html": {"schema": {"type": "string"}}}
_FORM = "application/x-www-form-urlencoded"

_OAUTH_ERROR: dict[str, Any] = {
    "title": "OAuthError",
    "description": "OAuth 2.0 error response (RFC 6749 section 5.2).",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "string",
            "enum": [
                "invalid_request",
                "invalid_client",
                "invalid_grant",
                "unauthorized_client",
                "unsupported_grant_type",
                "invalid_scope",
            ],
        },
        "error_description": {"type": "string"},
    },
}


def _oauth_error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _OAUTH_ERROR}}}


def _page(description: str) -> dict[str, Any]:
    return {"description": description, "content": _HTML}


def _query(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


_REDIRECT = {
    "description": (
        "To the app's registered redirect_uri with `code` and `state` (RFC 6749 4.1.2), or with "
        "`error` once the client and its redirect_uri are verified (4.1.2.1)"
    ),
    "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
}
_ERROR_PAGE = _page(
    "Authorization error page: the client or its redirect_uri cannot be trusted, so the server "
    "does not redirect (RFC 6749 4.1.2.1)"
)

#: GET /auth/authorize (RFC 6749 4.1.1, SMART App Launch 2.x app-launch.html#obtain-authorization-code).
AUTHORIZE_GET: dict[str, Any] = {
    "summary": "OAuth 2.0 authorization endpoint: the sign-in page (RFC 6749 4.1.1)",
    "parameters": [
        _query("response_type", "`code`", required=True),
        _query("client_id", "The registered app", required=True),
        _query("redirect_uri", "One of the app's registered redirect URIs", required=True),
        _query("scope", "SMART scopes, e.g. `launch/patient patient/*.rs`", required=True),
        _query("state", "Opaque value returned to the app", required=True),
        _query("aud", "The FHIR base URL the token is for", required=True),
        _query("code_challenge", "PKCE challenge (RFC 7636), S256", required=True),
        _query("code_challenge_method", "`S256`", required=True),
        _query("launch", "EHR launch: the launch value the EHR gave the app (needs the `launch` scope)"),
    ],
    "responses": {
        "200": _page("The sign-in form"),
        "302": _REDIRECT,
        "400": _ERROR_PAGE,
        "401": _page("Authorization error page: unknown client (invalid_client)"),
    },
}

#: POST /auth/authorize: the sign-in form, the patient choice and the user's decision.
AUTHORIZE_POST: dict[str, Any] = {
    "summary": "OAuth 2.0 authorization endpoint: sign in, choose a patient, allow or deny",
    "requestBody": {
        "required": True,
        "content": {
            _FORM: {
                "schema": {
                    "type": "object",
                    "description": "The authorization request's parameters (as for GET), plus:",
                    "properties": {
                        "username": {"type": "string"},
                        "password": {"type": "string", "format": "password"},
                        "decision": {"type": "string", "enum": ["allow", "deny"]},
                        "patient": {"type": "string", "description": "The chosen patient (launch/patient)"},
                        "ticket": {"type": "string", "description": "Carries the sign-in to the choice"},
                    },
                }
            }
        },
    },
    "responses": {
        "200": _page("The patient choice (scope launch/patient)"),
        "302": _REDIRECT,
        "400": _page("A patient that is not on the list, or an untrusted client or redirect_uri"),
        "401": _page("Unknown username or wrong password, or the sign-in expired"),
        "403": _page("The user may open no patient and the app needs one (access_denied)"),
        "429": _page("Too many failed sign-ins: paused, see Retry-After (ADR 0011)"),
    },
}

#: POST /auth/token (RFC 6749 3.2, 4.1.3, 4.4; SMART Backend Services client_credentials).
TOKEN: dict[str, Any] = {
    "summary": "OAuth 2.0 token endpoint (RFC 6749 3.2)",
    "requestBody": {
        "required": True,
        "content": {
            _FORM: {
                "schema": {
                    "type": "object",
                    "required": ["grant_type"],
                    "properties": {
                        "grant_type": {
                            "type": "string",
                            "enum": ["authorization_code", "client_credentials", "refresh_token"],
                        },
                        "code": {"type": "string"},
                        "redirect_uri": {"type": "string"},
                        "code_verifier": {"type": "string", "description": "PKCE (RFC 7636)"},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string", "format": "password"},
                        "client_assertion_type": {"type": "string"},
                        "client_assertion": {
                            "type": "string",
                            "description": "private_key_jwt (RFC 7523), SMART Backend Services",
                        },
                        "scope": {"type": "string"},
                        "refresh_token": {"type": "string"},
                    },
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "Access token response (RFC 6749 5.1) with the SMART launch context",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["access_token", "token_type"],
                        "properties": {
                            "access_token": {"type": "string"},
                            "token_type": {"type": "string", "enum": ["Bearer"]},
                            "expires_in": {"type": "integer"},
                            "scope": {"type": "string"},
                            "refresh_token": {"type": "string"},
                            "patient": {"type": "string"},
                            "encounter": {"type": "string"},
                            "id_token": {"type": "string"},
                        },
                    }
                }
            },
        },
        "400": _oauth_error("invalid_request, invalid_grant, unsupported_grant_type, invalid_scope..."),
        "401": _oauth_error("Client authentication failed (invalid_client)"),
        "429": _oauth_error("Too many failed attempts for this client or address; see Retry-After"),
    },
}

#: POST /auth/revoke (RFC 7009): an app's sign-out ends its refresh token family (ADR 0047).
REVOKE: dict[str, Any] = {
    "summary": "OAuth 2.0 token revocation (RFC 7009): revoke a refresh token and its family",
    "requestBody": {
        "required": True,
        "content": {
            _FORM: {
                "schema": {
                    "type": "object",
                    "required": ["token"],
                    "properties": {
                        "token": {"type": "string", "description": "The refresh token"},
                        "token_type_hint": {"type": "string", "enum": ["refresh_token", "access_token"]},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string", "format": "password"},
                    },
                }
            }
        },
    },
    "responses": {
        "200": {"description": "Revoked, or nothing to revoke (RFC 7009 2.2 answers both alike)"},
        "400": _oauth_error("invalid_request (no token), unsupported_token_type"),
        "401": _oauth_error("Client authentication failed (invalid_client)"),
        "429": _oauth_error("Too many failed attempts for this client or address; see Retry-After"),
    },
}

#: GET /auth/jwks (RFC 7517 5).
JWKS: dict[str, Any] = {
    "summary": "The public keys that sign access tokens (RFC 7517)",
    "responses": {
        "200": {
            "description": "JWK Set",
            "content": {"application/json": {"schema": {"type": "object", "required": ["keys"]}}},
        }
    },
}

#: GET /auth/ehr-launch (ADR 0042): the built-in EHR launcher's sign-in page.
EHR_LAUNCH_GET: dict[str, Any] = {
    "summary": "EHR launcher: sign in and choose an app to launch (SMART App Launch 2.x EHR launch)",
    "responses": {"200": _page("The sign-in form with the apps that have a launch_url")},
}

#: POST /auth/ehr-launch: sign in, choose the patient, be sent to the app's launch_url.
EHR_LAUNCH_POST: dict[str, Any] = {
    "summary": "EHR launcher: create a launch context and redirect to the app with iss and launch",
    "requestBody": {
        "required": True,
        "content": {
            _FORM: {
                "schema": {
                    "type": "object",
                    "required": ["client_id"],
                    "properties": {
                        "client_id": {"type": "string", "description": "An app with a launch_url"},
                        "username": {"type": "string"},
                        "password": {"type": "string", "format": "password"},
                        "patient": {"type": "string", "description": "One of the user's patients"},
                        "encounter": {"type": "string", "description": "Optional encounter id"},
                        "ticket": {"type": "string", "description": "Carries the sign-in to the choice"},
                        "decision": {"type": "string", "enum": ["allow", "deny"]},
                    },
                }
            }
        },
    },
    "responses": {
        "200": _page("The patient choice"),
        "303": {
            "description": "To the app's launch_url with `iss` (the FHIR base) and `launch`",
            "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
        },
        "400": _page("An app without a launch_url, or a patient that is not on the user's list"),
        "401": _page("Unknown username or wrong password, or the sign-in expired"),
        "403": _page("The user may open no patient"),
        "429": _page("Too many failed sign-ins: paused, see Retry-After (ADR 0011)"),
    },
}
