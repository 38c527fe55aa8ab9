"""SMART Backend Services authentication for the upstream FHIR server: the sync worker is a
system-to-system client with no user, so it authenticates itself with a signed JWT
(client_credentials grant + private_key_jwt, SMART App Launch 2.x backend-services.html).

`SmartBackendAuth` is an `httpx.Auth`: the token and discovery requests are yielded from the auth
flow, so they travel through the same client, transport and timeouts as the FHIR requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey, import_key

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_SCOPE",
    "SmartAuthError",
    "SmartBackendAuth",
    "SmartConfigurationError",
    "TokenRequestRefused",
]

#: RFC 7523 section 2.2: the client authenticates with a JWT (private_key_jwt).
CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART v1 spelling, which SMART 2.x servers still accept; what the sync worker needs (PUT, DELETE, read).
DEFAULT_SCOPE: Final = "system/*.write system/*.read"
#: backend-services.html: RS384 and ES384 are the algorithms servers SHALL support.
_KEY_TYPES: Final = {"RS384": "RSA", "ES384": "EC"}
#: backend-services.html: the assertion's exp is "no more than five minutes in the future".
_MAX_ASSERTION_LIFETIME: Final = 300
#: SMART requires expires_in; if a server leaves it out, assume the spec's usual five minutes.
_DEFAULT_EXPIRES_IN: Final = 300.0


class SmartAuthError(Exception):
    """The upstream's authorization server could not be used: nothing was sent to the FHIR server."""


class SmartConfigurationError(SmartAuthError):
    """`.well-known/smart-configuration` is missing, unreadable, or offers nothing we can use."""


class TokenRequestRefused(SmartAuthError):
    """The token endpoint refused the client_credentials request (RFC 6749 section 5.2)."""

    def __init__(self, status: int, error: str, description: str | None) -> None:
        self.status = status
        self.error = error
        self.description = description
        detail = f": {description}" if description else ""
        super().__init__(f"token request refused with HTTP {status} {error}{detail}")


@dataclass(frozen=True)
class _AccessToken:
    value: str
    refresh_at: float  # time.monotonic() after which we ask for a new one


class SmartBackendAuth(httpx.Auth):
    """Bearer tokens from a SMART Backend Services token endpoint, fetched on first use, reused until
    shortly before `expires_in`, and renewed once when the FHIR server answers 401 (revoked early).

    `token_url` may be left out when `fhir_base_url` is given: it is then read from
    `[base]/.well-known/smart-configuration` (`token_endpoint`) on first use.
    """

    requires_response_body = True  # the token and discovery answers are JSON to parse

    def __init__(
        self,
        token_url: str | None,
        client_id: str,
        private_key_pem: str | bytes,
        key_id: str,
        algorithm: str = "RS384",
        scope: str = DEFAULT_SCOPE,
        *,
        fhir_base_url: str | None = None,
        assertion_lifetime: int = 240,
        refresh_margin: float = 30.0,
    ) -> None:
        if not token_url and not fhir_base_url:
            raise ValueError("token_url or fhir_base_url (for .well-known discovery) is required")
        if not client_id:
            raise ValueError("client_id must not be empty")
        if not key_id:
            raise ValueError("key_id must not be empty: the server picks the public key by kid")
        if algorithm not in _KEY_TYPES:
            raise ValueError(f"algorithm must be RS384 or ES384, got {algorithm!r}")
        if not scope.strip():
            raise ValueError("scope must not be empty")
        if not 0 < assertion_lifetime <= _MAX_ASSERTION_LIFETIME:
            raise ValueError(f"assertion_lifetime must be in 1..300 seconds, got {assertion_lifetime}")
        if refresh_margin < 0:
            raise ValueError(f"refresh_margin must be >= 0, got {refresh_margin}")
        self._key = _private_key(private_key_pem, algorithm)
        self._token_url = token_url
        self._fhir_base_url = fhir_base_url.rstrip("/") if fhir_base_url else None
        self.client_id = client_id
        self.key_id = key_id
        self.algorithm = algorithm
        self.scope = scope
        self.assertion_lifetime = assertion_lifetime
        self.refresh_margin = refresh_margin
        self._token: _AccessToken | None = None

    @property
    def token_url(self) -> str | None:
        """The token endpoint, or None until discovery has run."""
        return self._token_url

    def invalidate(self) -> None:
        """Forget the cached access token (the next request fetches a new one)."""
        self._token = None

    def client_assertion(self) -> str:
        """A fresh signed JWT that authenticates this client to the token endpoint
        (backend-services.html "Authentication JWT"): iss = sub = client_id, aud = token URL,
        exp at most five minutes ahead, a jti never used before."""
        if self._token_url is None:
            raise SmartAuthError("the token endpoint is not known yet (discovery has not run)")
        header = {"alg": self.algorithm, "kid": self.key_id, "typ": "JWT"}
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self._token_url,
            "exp": int(time.time()) + self.assertion_lifetime,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(header, claims, self._key, algorithms=[self.algorithm])

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._token
        if token is None or time.monotonic() >= token.refresh_at:
            token = yield from self._fetch_token()
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code != 401:
            return
        # Revoked or expired ahead of expires_in (server restart, key rotation): renew once; a
        # second 401 goes back to the caller, who classifies it like any refusal.
        if self._token is token:
            self._token = None
        token = yield from self._fetch_token()
        request.headers["Authorization"] = f"Bearer {token.value}"
        yield request

    def _fetch_token(self) -> Generator[httpx.Request, httpx.Response, _AccessToken]:
        """POST the client_credentials grant (backend-services.html "Access token request")."""
        if self._token_url is None:
            self._token_url = yield from self._discover_token_url()
        requested_at = time.monotonic()
        response = yield httpx.Request(
            "POST",
            self._token_url,
            headers={"Accept": "application/json"},
            data={
                "grant_type": "client_credentials",
                "scope": self.scope,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(),
            },
        )
        body = _json_object(response)
        if response.status_code != 200:
            error = body.get("error") if body is not None else None
            description = body.get("error_description") if body is not None else None
            raise TokenRequestRefused(
                response.status_code,
                error if isinstance(error, str) else "no OAuth error code",
                description if isinstance(description, str) else response.text[:500] or None,
            )
        if body is None or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise SmartAuthError(f"token response from {self._token_url} has no access_token")
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise SmartAuthError(f"token response has token_type {token_type!r}, not bearer")
        expires_in = body.get("expires_in", _DEFAULT_EXPIRES_IN)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            raise SmartAuthError(f"token response has an unusable expires_in {expires_in!r}")
        # Ask again a little before the server's deadline, so no request leaves with a token that
        # expires on the way; short-lived tokens keep at least half their life.
        margin = min(self.refresh_margin, expires_in / 2)
        token = _AccessToken(body["access_token"], requested_at + expires_in - margin)
        self._token = token
        return token

    def _discover_token_url(self) -> Generator[httpx.Request, httpx.Response, str]:
        """Read token_endpoint from `[base]/.well-known/smart-configuration` (SMART App Launch 2.x
        conformance.html) and check the server offers private_key_jwt with our algorithm."""
        assert self._fhir_base_url is not None  # the constructor demands one of the two
        url = f"{self._fhir_base_url}/.well-known/smart-configuration"
        response = yield httpx.Request("GET", url, headers={"Accept": "application/json"})
        body = _json_object(response)
        if response.status_code != 200 or body is None:
            raise SmartConfigurationError(
                f"GET {url} answered HTTP {response.status_code}, not a JSON object"
            )
        token_url = body.get("token_endpoint")
        if not isinstance(token_url, str) or not token_url:
            raise SmartConfigurationError(f"{url} has no token_endpoint")
        methods = body.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            raise SmartConfigurationError(f"{url} does not offer private_key_jwt (offers {methods})")
        algorithms = body.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algorithms, list) and self.algorithm not in algorithms:
            raise SmartConfigurationError(f"{url} does not accept {self.algorithm} (accepts {algorithms})")
        return token_url


def _private_key(pem: str | bytes, algorithm: str) -> RSAKey | ECKey:
    """Load the PEM private key and check it can sign `algorithm` (ES384 needs a P-384 curve)."""
    key_type = _KEY_TYPES[algorithm]
    try:
        key = import_key(pem, "RSA") if key_type == "RSA" else import_key(pem, "EC")
    except (JoseError, ValueError, TypeError) as exc:
        raise ValueError(f"private_key_pem is not a PEM {key_type} key for {algorithm}: {exc}") from exc
    if not key.is_private:
        raise ValueError("private_key_pem holds a public key; the private key is needed to sign")
    if isinstance(key, ECKey) and key.curve_name != "P-384":
        raise ValueError(f"private_key_pem is an EC {key.curve_name} key; ES384 needs P-384")
    return key


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
