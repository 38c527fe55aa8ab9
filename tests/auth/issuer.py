"""A stand-in external authorization server for tests and benches: a real JWKS over loopback HTTP and
a signing key that mints SMART access tokens with whatever claims a test needs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from tests.loopback import RecordingServer, json_answer

ISSUER = "https://auth.hospital.example"


class JwksServer:
    """Serves whatever key set the test puts in `.jwks` at /jwks, and counts the fetches."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self._server = RecordingServer(lambda method, path, body: json_answer(self.jwks)).__enter__()
        self.url = f"{self._server.url}/jwks"

    @property
    def requests(self) -> int:
        return len(self._server.requests)

    def close(self) -> None:
        self._server.__exit__(None, None, None)


class TestIssuer:
    """An ES256 issuer whose public key the JwksServer publishes."""

    __test__ = False  # not a pytest test class

    def __init__(self, audience: str, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key = ECKey.generate_key("P-256", parameters={"kid": "test-key-1"}, private=True)
        self.jwks = JwksServer()
        self.jwks.jwks = {"keys": [self.key.as_dict(private=False)]}

    @property
    def facade_settings(self) -> dict[str, Any]:
        """Settings of a facade in SMART resource-server mode that trusts this issuer."""
        return {"auth": "smart", "auth_issuer": self.issuer, "auth_jwks_url": self.jwks.url}

    def claims(self, scope: str, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-1",
            "client_id": "test-app",
            "scope": scope,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self, scope: str, *, key: ECKey | None = None, header: dict[str, Any] | None = None, **extra: Any
    ) -> str:
        return jwt.encode(
            header or {"alg": "ES256", "kid": "test-key-1"}, self.claims(scope, **extra), key or self.key
        )

    def headers(self, scope: str, **extra: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.mint(scope, **extra)}"}

    def close(self) -> None:
        self.jwks.close()
