"""The authorization server's token signing key: created once, kept as a private JWK file.

ES256 (P-256): short signatures and cheap verification, and every SMART resource server accepts it.
The file is created with mode 0600 (linked into place atomically, so two processes starting together
end up with the same key) and read back on later starts, so tokens survive restarts. The ``kid`` is
the key's RFC 7638 thumbprint, which the resource server uses to pick the key from /auth/jwks.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from pathlib import Path

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

__all__ = ["SIGNING_ALGORITHM", "SigningKey"]

SIGNING_ALGORITHM = "ES256"
_CURVE = "P-256"

log = logging.getLogger(__name__)


class SigningKey:
    """The private key that signs access tokens, and its public half for /auth/jwks."""

    algorithm = SIGNING_ALGORITHM

    def __init__(self, key: ECKey) -> None:
        if not key.is_private:
            raise ValueError("key: a signing key needs its private part")
        key.ensure_kid()
        self.key = key

    @property
    def kid(self) -> str:
        kid = self.key.kid
        assert kid is not None  # ensure_kid set it
        return kid

    def public_key_set(self) -> KeySet:
        """The public key as a JWKS, marked for signatures with our algorithm."""
        public = self.key.as_dict(private=False)
        public.update({"use": "sig", "alg": self.algorithm})
        return KeySet.import_key_set({"keys": [public]})

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Read the key from ``path``, or create it there (mode 0600) when the file does not exist."""
        if path.exists():
            return cls._load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ECKey.generate_key(_CURVE, private=True, auto_kid=True)
        # Write a private temporary file, then hard-link it into place: the link fails if another
        # process got there first, and nobody ever reads a half-written key.
        fd, temporary = tempfile.mkstemp(prefix=".signing-key-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(key.as_dict(private=True), handle)
            os.link(temporary, path)
        except FileExistsError:
            return cls._load(path)
        finally:
            os.unlink(temporary)
        log.info("Created the authorization server's signing key %s (kid %s)", path, key.kid)
        return cls(key)

    @classmethod
    def _load(cls, path: Path) -> SigningKey:
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("The signing key %s is readable by other users (mode %o); chmod 600 it", path, mode)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            key = ECKey.import_key(data)
        except (OSError, ValueError, JoseError) as exc:
            raise ValueError(f"{path}: not a private EC JWK ({exc}); delete it to create a new key") from exc
        if not key.is_private or key.get("crv") != _CURVE:
            raise ValueError(f"{path}: expected a private {_CURVE} EC JWK; delete it to create a new key")
        return cls(key)
