"""Hashes for user passwords and client secrets in the registry file (scrypt, RFC 7914).

The registry holds only hashes, so a leaked file does not leak credentials. A hash records its own
parameters and salt (``scrypt$<log2 N>$<r>$<p>$<salt>$<digest>``, base64url without padding), so the
cost can be raised later without invalidating the hashes already stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["check_hash_format", "hash_secret", "verify_secret"]

_SCHEME = "scrypt"
_LOG2_N = 14  # N = 16384, r = 8: 16 MiB and tens of milliseconds per check
_R = 8
_P = 1
_SALT_BYTES = 16
_DIGEST_BYTES = 32
_MAX_MEMORY = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(secret: str, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=1 << log2_n, r=r, p=p, maxmem=_MAX_MEMORY, dklen=length
    )


def hash_secret(secret: str) -> str:
    """A salted scrypt hash of ``secret`` for the registry file."""
    if not secret:
        raise ValueError("secret must not be empty")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _derive(secret, salt, _LOG2_N, _R, _P, _DIGEST_BYTES)
    return f"{_SCHEME}${_LOG2_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError(f"expected '{_SCHEME}$<log2 N>$<r>$<p>$<salt>$<digest>' (see hash_secret)")
    try:
        log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise ValueError(f"malformed {_SCHEME} hash: {exc}") from None
    if not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16) or len(salt) < 8 or len(digest) < 16:
        raise ValueError(f"{_SCHEME} hash parameters out of range")
    return log2_n, r, p, salt, digest


def check_hash_format(encoded: str) -> None:
    """Raise ValueError unless ``encoded`` is a hash that ``verify_secret`` can check."""
    _parse(encoded)


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (constant-time comparison of the digests)."""
    log2_n, r, p, salt, digest = _parse(encoded)
    candidate = _derive(secret, salt, log2_n, r, p, len(digest))
    return hmac.compare_digest(candidate, digest)
