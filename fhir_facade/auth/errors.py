"""The OAuth side of errors: 401 and 403 with their RFC 6750 `WWW-Authenticate: Bearer` challenge."""

from __future__ import annotations

from fhir_facade.fhir.errors import FhirError, error

__all__ = ["forbidden", "unauthorized"]


def _bearer_challenge(error: str | None, description: str | None, scope: str | None = None) -> str:
    """An RFC 6750 section 3 `WWW-Authenticate: Bearer` challenge (quotes and backslashes escaped)."""
    parts = ['realm="fhir"']
    for name, value in (("error", error), ("error_description", description), ("scope", scope)):
        if value:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{name}="{escaped}"')
    return "Bearer " + ", ".join(parts)


def unauthorized(diagnostics: str, *, token_error: str | None = None) -> FhirError:
    """401: no usable credentials. `token_error` is RFC 6750's error code: None when the request carried
    no token (the challenge then names no error), "invalid_token" for a bad one, "invalid_request" for a
    malformed Authorization header."""
    return error(
        401,
        "login",
        diagnostics,
        detail_code=token_error,
        headers={"WWW-Authenticate": _bearer_challenge(token_error, diagnostics if token_error else None)},
    )


def forbidden(diagnostics: str, *, scope: str | None = None) -> FhirError:
    """403 insufficient_scope (RFC 6750 3.1): the token is valid but does not grant this; `scope` names
    a scope that would."""
    return error(
        403,
        "forbidden",
        diagnostics,
        detail_code="insufficient_scope",
        headers={"WWW-Authenticate": _bearer_challenge("insufficient_scope", diagnostics, scope)},
    )
