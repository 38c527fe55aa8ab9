"""Client authentication by signed JWT assertion (``private_key_jwt``) for SMART Backend Services.

SMART App Launch 2.x, backend-services.html ("Authenticating to the Token endpoint"), on top of
RFC 7523 2.2 / 3. authlib's ``JWTBearerClientAssertion`` finds the client from ``sub`` and looks up
its keys; this subclass tightens what authlib leaves open:

- the header ``alg`` must be RS384 or ES384, checked before any key is touched, so ``none``, every
  HMAC algorithm and anything else is refused outright (authlib would otherwise use joserfc's default
  algorithm set, which lacks RS384/ES384 and includes HS256);
- ``iss`` = ``sub`` = the client_id (and equal to a ``client_id`` form parameter, if one is sent);
  ``aud`` = our token URL; ``exp`` in the future and at most five minutes away;
- ``jti`` is single use: remembered until the assertion expires, so a captured assertion cannot be
  replayed. The cache is in process memory: several replicas need an external authorization server.

Error descriptions are our own, in RFC 6749's ASCII subset, never a library's message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
from authlib.oauth2.rfc6749 import InvalidClientError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError, MissingClaimError
from joserfc.jwk import KeySet, KeySetSerialization

from fhir_facade.auth.server.clients import PRIVATE_KEY_JWT, RegisteredClient
from fhir_facade.auth.server.errors import safe_description

__all__ = ["ASSERTION_ALGORITHMS", "MAX_ASSERTION_LIFETIME", "JtiReplayCache", "SmartClientAssertion"]

ASSERTION_ALGORITHMS = ("RS384", "ES384")
#: SMART: "exp ... SHALL be no more than five minutes in the future".
MAX_ASSERTION_LIFETIME = 300

log = logging.getLogger(__name__)


class JtiReplayCache:
    """The ``jti`` values of accepted assertions, per client, until the assertions expire."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def first_use(self, client_id: str, jti: str, forget_after: float) -> bool:
        """Record ``jti``; False when the client already used it (and it is not yet forgotten)."""
        now = self._clock()
        with self._lock:
            for key in [k for k, until in self._seen.items() if until <= now]:
                del self._seen[key]
            if (client_id, jti) in self._seen:
                return False
            self._seen[(client_id, jti)] = forget_after
            return True


def _invalid(description: str) -> InvalidClientError:
    return InvalidClientError(description=safe_description(description))


class SmartClientAssertion(JWTBearerClientAssertion):
    """The ``private_key_jwt`` method, registered with the token endpoint's client authentication."""

    CLIENT_AUTH_METHOD = PRIVATE_KEY_JWT

    def __init__(
        self,
        token_url: str,
        *,
        replay_cache: JtiReplayCache | None = None,
        http: httpx.Client | None = None,
        leeway: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(validate_jti=True, leeway=leeway)
        self._token_url = token_url
        self._replay_cache = replay_cache or JtiReplayCache(clock)
        self._http = http
        self._clock = clock

    def __call__(self, query_client: Callable[[str], Any], request: Any) -> Any:
        client = super().__call__(query_client, request)
        sent_id = request.form.get("client_id")
        if client is not None and sent_id is not None and sent_id != client.get_client_id():
            raise _invalid("client_id does not match the assertion's sub")
        return client

    def get_audiences(self) -> list[str]:
        return [self._token_url]

    def extract_assertion(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            headers, claims = super().extract_assertion(assertion)
        except RecursionError as exc:  # authlib's json_loads catches ValueError only
            raise _invalid("Invalid JWT payload (nested too deeply).") from exc
        algorithm = headers.get("alg")
        if algorithm not in ASSERTION_ALGORITHMS:
            raise _invalid(
                f"client assertion alg {algorithm!r} is not accepted; sign it with "
                f"{' or '.join(ASSERTION_ALGORITHMS)}"
            )
        return headers, claims

    def resolve_client_public_key(self, client: RegisteredClient) -> KeySet:
        """The client's registered JWKS, or the one at its jwks_url (fetched per assertion: backend
        clients ask for tokens every few minutes at most, and a rotated key then works at once)."""
        entry = client.entry
        if entry.jwks is not None:
            return KeySet.import_key_set(cast(KeySetSerialization, entry.jwks))
        assert entry.jwks_url is not None  # the registry requires one of the two
        try:
            if self._http is not None:
                response = self._http.get(entry.jwks_url)
            else:
                with httpx.Client(timeout=10) as http:
                    response = http.get(entry.jwks_url)
            response.raise_for_status()
            return KeySet.import_key_set(response.json())
        except (httpx.HTTPError, ValueError, JoseError, KeyError, TypeError) as exc:
            log.warning(
                "Could not read the JWKS of client %s at %s: %s", entry.client_id, entry.jwks_url, exc
            )
            raise _invalid(f"the client's jwks_url {entry.jwks_url} could not be read") from exc

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> dict[str, Any]:
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=list(ASSERTION_ALGORITHMS))
        except JoseError as exc:
            log.info("Client assertion refused: %s", exc)
            raise _invalid("the client assertion's signature does not verify with the client's keys") from exc
        self.verify_claims(token.claims)
        return dict(token.claims)

    def verify_claims(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(now),
            leeway=self.leeway,
            iss={"essential": True},
            sub={"essential": True},
            aud={"essential": True, "values": self.get_audiences()},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise _invalid("the client assertion has expired") from None
        except MissingClaimError as exc:
            raise _invalid(f"the client assertion lacks {exc.claim}") from None
        except ClaimError as exc:
            if exc.claim == "aud":
                wanted = self._token_url
                raise _invalid(f"the client assertion's aud must be the token URL {wanted}") from None
            raise _invalid(f"the client assertion's {exc.claim} claim is invalid") from None
        if claims["iss"] != claims["sub"]:
            raise _invalid("the client assertion's iss and sub must both be the client_id")
        expires = float(claims["exp"])
        if expires > now + MAX_ASSERTION_LIFETIME + self.leeway:
            raise _invalid(
                f"the client assertion's exp is more than {MAX_ASSERTION_LIFETIME} seconds in the future"
            )
        if not self._replay_cache.first_use(claims["sub"], claims["jti"], expires + self.leeway):
            raise _invalid("the client assertion's jti was used before (replayed assertion)")
