"""Bearer JWT validation for resource-server mode (SMART App Launch 2.x; RFC 7519, RFC 8725).

What a token must be to be believed:
- signed with an asymmetric algorithm we accept (RS256/384/512, PS256/384/512, ES256/384):
  `alg: none` and every HMAC algorithm are refused before any key is looked at, so a token "signed"
  with the issuer's *public* key as an HMAC secret (the classic algorithm-confusion forgery) and
  an unsigned token are both invalid;
- verified against the issuer's JWKS, looked up by `kid`; an unknown `kid` refreshes the cached
  JWKS once (keys rotate), at most every `refresh_interval` seconds (an attacker sending random
  kids must not make us hammer the issuer);
- `iss` equal to the configured issuer, `aud` containing our FHIR base, `exp` present and in the
  future and `nbf`/`iat` not in the future, each with a small leeway for clock skew.

Opaque (non-JWT) tokens are checked by RFC 7662 introspection when an introspection endpoint is
configured (``IntrospectionValidator``); ``BearerValidator`` picks one of the two per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from joserfc import jws, jwt
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError, MissingAlgorithmError, MissingClaimError
from joserfc.jwk import KeySet

__all__ = [
    "ACCEPTED_ALGORITHMS",
    "BearerValidator",
    "IntrospectionValidator",
    "InvalidToken",
    "JwksCache",
    "KeySource",
    "StaticKeys",
    "TokenClaims",
    "TokenValidator",
    "looks_like_jwt",
]

ACCEPTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")


class InvalidToken(Exception):
    """The bearer token is not acceptable; the message says why (for logs and the
    `WWW-Authenticate: Bearer error="invalid_token", error_description=...` header)."""


@dataclass(frozen=True)
class TokenClaims:
    """What the rest of the server needs from a validated token."""

    subject: str | None
    client_id: str | None
    scope: str
    patient: str | None
    fhir_user: str | None
    expires_at: int
    raw: dict[str, Any] = field(repr=False)

    @property
    def token_id(self) -> str | None:
        return _text(self.raw.get("jti"))

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> TokenClaims:
        return cls(
            subject=_text(claims.get("sub")),
            client_id=_text(claims.get("client_id")) or _text(claims.get("azp")),
            scope=_text(claims.get("scope")) or _scopes_from_list(claims.get("scp")),
            patient=_text(claims.get("patient")),
            fhir_user=_text(claims.get("fhirUser")),
            expires_at=int(claims["exp"]),
            raw=dict(claims),
        )


class KeySource(Protocol):
    """Where a validator finds the key set that holds a token's `kid`."""

    def key_set(self, kid: str | None) -> KeySet: ...


class StaticKeys:
    """Keys known in-process (the built-in authorization server's): nothing to fetch or refresh."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    def key_set(self, kid: str | None) -> KeySet:
        if kid is not None and not any(key.kid == kid for key in self._keys.keys):
            raise InvalidToken(f"no key with kid {kid!r} at the issuer")
        return self._keys


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, read before the signature is verified (RFC 7515 5.2) to choose the key
    and refuse an algorithm; joserfc bounds the segment sizes (a 1,000-deep header never parses)."""
    try:
        header = jws.extract_compact(token.encode("ascii")).headers()
    except MissingAlgorithmError:
        return {}  # no alg: refused by name below, like any other unacceptable algorithm
    except (JoseError, ValueError, RecursionError) as exc:  # ValueError: not ASCII
        raise InvalidToken("the token is not a JWS compact serialisation") from exc
    if not isinstance(header, dict):
        raise InvalidToken("the token header is not a JSON object")
    return header


class JwksCache:
    """The issuer's signing keys, fetched once and refreshed when an unknown `kid` appears."""

    def __init__(
        self,
        jwks_url: str,
        *,
        refresh_interval: float = 60.0,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = jwks_url
        self._refresh_interval = refresh_interval
        self._http = http or httpx.Client(timeout=10)
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at: float | None = None
        self.fetches = 0

    def _fetch(self) -> None:
        try:
            response = self._http.get(self._url)
            response.raise_for_status()
            self._keys = KeySet.import_key_set(response.json())
        except (httpx.HTTPError, ValueError, JoseError) as exc:
            raise InvalidToken(f"the issuer's keys could not be read from {self._url}: {exc}") from exc
        finally:
            self._fetched_at = self._clock()
            self.fetches += 1

    def key_set(self, kid: str | None) -> KeySet:
        """The key set holding `kid`, refreshing it (rate-limited) when `kid` is new."""
        if self._keys is None:
            self._fetch()
        assert self._keys is not None
        if kid is not None and not self._has(kid):
            due = self._fetched_at is None or self._clock() - self._fetched_at >= self._refresh_interval
            if due:
                self._fetch()
            if not self._has(kid):
                raise InvalidToken(f"no key with kid {kid!r} at the issuer")
        return self._keys

    def _has(self, kid: str) -> bool:
        assert self._keys is not None
        return any(key.kid == kid for key in self._keys.keys)


class TokenValidator:
    """Validates bearer JWTs of one issuer for one audience (our FHIR base URL)."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys: KeySource,
        leeway: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._keys = keys
        self._leeway = leeway
        self._clock = clock

    def validate(self, token: str) -> TokenClaims:
        header = _header(token)
        algorithm = header.get("alg")
        if algorithm not in ACCEPTED_ALGORITHMS:
            raise InvalidToken(f"signing algorithm {algorithm!r} is not accepted")
        key_set = self._keys.key_set(header.get("kid"))
        try:
            decoded = jwt.decode(token, key_set, algorithms=list(ACCEPTED_ALGORITHMS))
        except (JoseError, ValueError) as exc:
            raise InvalidToken(f"the signature does not verify: {exc}") from exc
        claims = decoded.claims
        check_claims(
            claims, issuer=self._issuer, audience=self._audience, now=self._clock(), leeway=self._leeway
        )
        return TokenClaims.from_claims(claims)


def check_claims(claims: dict[str, Any], *, issuer: str, audience: str, now: float, leeway: int) -> None:
    """iss, aud, exp (required), nbf and iat, as RFC 7519 4.1 defines them, with `leeway` seconds of
    skew: joserfc's claims registry decides, and its answer is told in our words (the
    `error_description` of the 401)."""
    registry = jwt.JWTClaimsRegistry(
        now=int(now),
        leeway=leeway,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
        exp={"essential": True},
    )
    try:
        registry.validate(claims)
    except ExpiredTokenError:
        raise InvalidToken("the token has expired") from None
    except MissingClaimError as exc:
        missing = set(exc.claim.split(","))
        first = next(name for name in ("iss", "aud", "exp") if name in missing)
        raise _claim_refusal(first, claims, audience) from None
    except ClaimError as exc:
        raise _claim_refusal(exc.claim, claims, audience) from None


def _claim_refusal(name: str, claims: dict[str, Any], audience: str) -> InvalidToken:
    if name == "iss":
        return InvalidToken(f"issuer {claims.get('iss')!r} is not trusted")
    if name == "aud":
        return InvalidToken(f"the token is for {claims.get('aud')!r}, not {audience}")
    if name == "exp":
        return InvalidToken("the token has no expiry (exp)")
    if name in ("nbf", "iat"):
        return InvalidToken(f"the token is not valid yet ({name})")
    return InvalidToken(f"the token's {name} claim is invalid")


def looks_like_jwt(token: str) -> bool:
    """A JWS compact serialisation has three dot-separated parts; opaque tokens usually do not."""
    return token.count(".") == 2


class IntrospectionValidator:
    """RFC 7662 token introspection for opaque tokens, with answers cached until the token's exp
    (at most `cache_seconds`): one authorization-server round trip per token, not per request.

    The introspection response must say active=true and carry the same claims a JWT would (scope,
    exp, and iss/aud when present are checked like a JWT's).
    """

    def __init__(
        self,
        *,
        url: str,
        client_id: str | None,
        client_secret: str | None,
        issuer: str,
        audience: str,
        http: httpx.Client | None = None,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._auth = httpx.BasicAuth(client_id, client_secret or "") if client_id else None
        self._issuer = issuer
        self._audience = audience
        self._http = http or httpx.Client(timeout=10)
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, TokenClaims]] = {}

    def validate(self, token: str) -> TokenClaims:
        now = self._clock()
        cached = self._cache.get(token)
        if cached and cached[0] > now:
            return cached[1]
        try:
            response = self._http.post(
                self._url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                headers={"Accept": "application/json"},
            )
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise InvalidToken(f"the token could not be introspected at {self._url}: {exc}") from exc
        if not isinstance(answer, dict) or answer.get("active") is not True:
            raise InvalidToken("the token is not active")
        claims = dict(answer)
        claims.setdefault("iss", self._issuer)
        claims.setdefault("aud", self._audience)
        check_claims(claims, issuer=self._issuer, audience=self._audience, now=now, leeway=30)
        result = TokenClaims.from_claims(claims)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (min(now + self._cache_seconds, result.expires_at), result)
        return result


class BearerValidator:
    """JWTs to the signature validator, everything else to introspection (when configured)."""

    def __init__(
        self, jwt_validator: TokenValidator | None, introspection: IntrospectionValidator | None
    ) -> None:
        self._jwt = jwt_validator
        self._introspection = introspection

    def validate(self, token: str) -> TokenClaims:
        if looks_like_jwt(token) and self._jwt is not None:
            return self._jwt.validate(token)
        if self._introspection is not None:
            return self._introspection.validate(token)
        raise InvalidToken("the token is not a JWT and no introspection endpoint is configured")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _scopes_from_list(value: Any) -> str:
    return " ".join(v for v in value if isinstance(v, str)) if isinstance(value, list) else ""
