"""Signing users in at the authorization endpoint, and who authorized a code."""

from __future__ import annotations

from dataclasses import dataclass

from fhir_facade.auth.server.passwords import hash_secret, verify_secret
from fhir_facade.auth.server.registry import Registry, UserEntry

__all__ = ["ResourceOwner", "UserDirectory"]


@dataclass(frozen=True)
class ResourceOwner:
    """The user who approved an authorization request, and the patient they picked (standalone launch
    with ``launch/patient``) or the EHR launch gave (with its encounter, if any). Travels with the
    authorization code into the access token."""

    username: str
    fhir_user: str | None
    patient: str | None
    encounter: str | None = None


class UserDirectory:
    """The registry's users, checked by password."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # Compared against when the username is unknown, so that a wrong username costs as much time
        # as a wrong password and response times do not tell which usernames exist.
        self._decoy_hash = hash_secret("decoy password that never matches")

    def authenticate(self, username: str, password: str) -> UserEntry | None:
        """The user, if ``password`` is theirs."""
        user = self._registry.user(username)
        matches = verify_secret(password, user.password_hash if user else self._decoy_hash)
        return user if user is not None and matches else None
