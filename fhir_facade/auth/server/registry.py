"""The registered clients and users of the built-in authorization server: one JSON file.

Format (``FACADE_AUTH_CLIENTS_FILE``, default ``<data_dir>/auth-clients.json``)::

    {
      "clients": [
        {"client_id": "demo-app", "name": "Demo SMART app", "kind": "public",
         "redirect_uris": ["http://127.0.0.1:9000/callback"],
         "scope": "launch/patient openid fhirUser patient/*.rs user/*.rs"},
        {"client_id": "viewer", "kind": "confidential", "client_secret_hash": "scrypt$14$8$1$...",
         "redirect_uris": ["https://viewer.example/cb"], "scope": "launch/patient patient/*.rs"},
        {"client_id": "nightly-export", "kind": "backend-service", "scope": "system/*.rs",
         "jwks": {"keys": [{"kty": "RSA", "kid": "k1", "n": "...", "e": "AQAB"}]}}
      ],
      "users": [
        {"username": "demo", "password_hash": "scrypt$14$8$1$...", "fhirUser": "Practitioner/demo",
         "patients": ["P-1001"]},
        {"username": "reading-room", "password_hash": "scrypt$14$8$1$...",
         "fhirUser": "Practitioner/rad1", "all_patients": true}
      ]
    }

- ``kind``: ``public`` (a browser or native app, no secret: authorization code + PKCE),
  ``confidential`` (the same, plus ``client_secret_hash``: HTTP Basic or POST secret at the token
  endpoint), ``backend-service`` (SMART Backend Services: client_credentials with a JWT assertion
  signed RS384/ES384 by a key in ``jwks``, or fetched from ``jwks_url``).
- ``scope``: the most the client may ever get; requests are narrowed to it (``scope_grants``).
  Backend services may hold ``system/`` scopes only, apps ``patient/``/``user/`` and the launch
  scopes; an app registered for ``online_access`` (or ``offline_access``) may ask for it and then
  gets refresh tokens (``refresh_tokens``, ADR 0047).
- ``launch_url`` (apps only, optional): the app's SMART launch URL, https or loopback http; apps
  with one are offered by the EHR launcher (``ehr_launch``, ADR 0042) and may register ``launch``.
- Secrets and passwords are stored as hashes only (``passwords.hash_secret``).
- ``patients``: the user's compartments: the Patient ids the user may pick at a standalone launch
  with ``launch/patient``, and the only patients a ``user/`` scope reaches for this user (a user with
  no list reaches no patient's data). ``all_patients: true`` lifts that for users who may see every
  patient (a reading room's radiologists); it is never the default (docs/adr/0009).

The file is read once at start-up; restart the facade after editing it. When it does not exist the
server writes a demo registry (the ``DEMO_*`` constants) and logs the demo user's password once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from authlib.common.security import is_secure_transport
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, KeySetSerialization
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fhir_facade.auth.scopes import InvalidScope, parse_scopes
from fhir_facade.auth.server.passwords import check_hash_format, hash_secret
from fhir_facade.demo.brain_mri import DEMO_PATIENT_ID
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.references import ReferenceKind, parse_reference

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_NAME",
    "DEMO_FHIR_USER",
    "DEMO_PATIENTS",
    "DEMO_REDIRECT_URIS",
    "DEMO_SCOPE",
    "DEMO_USERNAME",
    "ClientEntry",
    "ClientKind",
    "Registry",
    "RegistryError",
    "UserEntry",
    "create_demo_registry",
    "load_or_create_registry",
    "load_registry",
    "register_backend_client",
    "set_user_password",
    "with_clients",
    "write_registry",
]

DEMO_CLIENT_ID = "demo-app"
DEMO_CLIENT_NAME = "Demo SMART app"
DEMO_REDIRECT_URIS = ("http://127.0.0.1:9000/callback", "http://localhost:9000/callback")
DEMO_SCOPE = "launch/patient openid fhirUser patient/*.rs user/*.rs"
DEMO_USERNAME = "demo"
DEMO_FHIR_USER = "Practitioner/demo"
#: The demo user may pick the embedded demo study's patient (fhir_facade/demo/brain_mri.py).
DEMO_PATIENTS = (DEMO_PATIENT_ID,)

ClientKind = Literal["backend-service", "public", "confidential"]

#: Assertion algorithms of SMART Backend Services, and the keys that make them.
_ASSERTION_KEY_TYPES = {"RSA": "RS384", "EC": "ES384"}
_APP_CONTEXTS = ("patient", "user")

log = logging.getLogger(__name__)


def _is_user_reference(value: str) -> bool:
    """fhirUser (SMART App Launch 2.0 scopes-and-launch-context): a reference to a Practitioner,
    Patient... relative or absolute (http/https), not versioned."""
    parsed = parse_reference(value)
    absolute = parsed.kind is ReferenceKind.EXTERNAL and value.startswith(("http://", "https://"))
    return (parsed.is_local or absolute) and parsed.relative is not None and parsed.version is None


class RegistryError(ValueError):
    """The registry file is missing, unreadable or invalid; the message names the bad entry."""


class ClientEntry(BaseModel):
    """One registered client."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # RFC 6749 A.1: client_id is VSCHAR; we also refuse spaces, which would break HTTP Basic logs.
    client_id: str = Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
    name: str | None = None
    kind: ClientKind
    scope: str
    redirect_uris: tuple[str, ...] = ()
    client_secret_hash: str | None = None
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    #: The app's SMART launch URL: where the EHR launcher (ehr_launch) sends the browser with
    #: ``iss`` and ``launch``. Apps without one are not offered there (ADR 0042).
    launch_url: str | None = None

    @property
    def backend(self) -> bool:
        return self.kind == "backend-service"

    @property
    def display_name(self) -> str:
        return self.name or self.client_id

    @field_validator("scope")
    @classmethod
    def _valid_scope(cls, value: str) -> str:
        if not value.split():
            raise ValueError("scope must name at least one scope")
        try:
            parse_scopes(value)
        except InvalidScope as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("redirect_uris")
    @classmethod
    def _valid_redirect_uris(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for uri in values:
            # RFC 6749 3.1.2: an absolute URI without a fragment (private-use schemes allowed for
            # native apps, RFC 8252 7.1).
            parts = urlsplit(uri)
            if not parts.scheme or parts.fragment or (parts.scheme in ("http", "https") and not parts.netloc):
                raise ValueError(f"redirect URI {uri!r} must be an absolute URI without a fragment")
        return values

    @field_validator("client_secret_hash")
    @classmethod
    def _valid_secret_hash(cls, value: str | None) -> str | None:
        if value is not None:
            check_hash_format(value)
        return value

    @field_validator("jwks")
    @classmethod
    def _valid_jwks(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        keys = value.get("keys")
        if not isinstance(keys, list) or not keys:
            raise ValueError("jwks must be a JWK Set: {'keys': [<public JWK>, ...]}")
        for index, key in enumerate(keys):
            _check_public_assertion_key(index, key)
        try:
            KeySet.import_key_set(cast(KeySetSerialization, value))
        except (JoseError, ValueError, TypeError) as exc:
            raise ValueError(f"jwks cannot be imported: {exc}") from None
        return value

    @field_validator("jwks_url")
    @classmethod
    def _valid_jwks_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"jwks_url {value!r} must be an http(s) URL")
        return value

    @field_validator("launch_url")
    @classmethod
    def _valid_launch_url(cls, value: str | None) -> str | None:
        # The launch value travels in this URL's query: https only (or loopback for development).
        if value is not None:
            parts = urlsplit(value)
            if not parts.netloc or parts.fragment or not is_secure_transport(value):
                raise ValueError(
                    f"launch_url {value!r} must be an https URL (or http on a loopback address) "
                    "without a fragment"
                )
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ClientEntry:
        scopes = parse_scopes(self.scope)
        if self.backend:
            if self.jwks is None and self.jwks_url is None:
                raise ValueError("a backend-service client needs 'jwks' or 'jwks_url' (its public keys)")
            if self.redirect_uris or self.client_secret_hash or self.launch_url:
                raise ValueError(
                    "a backend-service client has no redirect_uris, no client_secret_hash and no launch_url"
                )
            wrong = [s.text for s in scopes.resources if s.context != "system"] + list(scopes.other)
            if wrong or not scopes.resources:
                raise ValueError(f"a backend-service client may hold system/ scopes only, not {wrong}")
            return self
        if not self.redirect_uris:
            raise ValueError(f"a {self.kind} client needs at least one redirect URI")
        if self.jwks is not None or self.jwks_url is not None:
            raise ValueError(f"a {self.kind} client takes no jwks (only backend-service clients do)")
        if (self.kind == "confidential") != (self.client_secret_hash is not None):
            raise ValueError(
                "client_secret_hash is required for confidential clients and refused for public ones"
            )
        system = [s.text for s in scopes.resources if s.context not in _APP_CONTEXTS]
        if system:
            raise ValueError(f"system/ scopes are for backend-service clients only, not {system}")
        return self


def _check_public_assertion_key(index: int, key: Any) -> None:
    if not isinstance(key, dict):
        raise ValueError(f"jwks key {index} is not a JSON object")
    if "d" in key or "p" in key:
        raise ValueError(f"jwks key {index} holds private key material; register the public key only")
    kty = key.get("kty")
    if kty not in _ASSERTION_KEY_TYPES:
        raise ValueError(f"jwks key {index}: kty {kty!r} cannot sign RS384 or ES384 assertions")
    if kty == "EC" and key.get("crv") != "P-384":
        raise ValueError(f"jwks key {index}: ES384 needs curve P-384, not {key.get('crv')!r}")
    if not isinstance(key.get("kid"), str) or not key["kid"]:
        raise ValueError(f"jwks key {index} needs a 'kid' (the assertion's header names it)")


class UserEntry(BaseModel):
    """One user who can sign in at the authorization endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    username: str = Field(min_length=1, max_length=200)
    password_hash: str
    fhir_user: str | None = Field(None, alias="fhirUser")
    patients: tuple[str, ...] = ()
    #: True: `user/` scopes reach every patient for this user; False: only `patients`.
    all_patients: bool = False

    @field_validator("password_hash")
    @classmethod
    def _valid_hash(cls, value: str) -> str:
        check_hash_format(value)
        return value

    @field_validator("fhir_user")
    @classmethod
    def _valid_fhir_user(cls, value: str | None) -> str | None:
        if value is not None and not _is_user_reference(value):
            raise ValueError(f"fhirUser {value!r} must be a reference such as 'Practitioner/123'")
        return value

    @field_validator("patients")
    @classmethod
    def _valid_patients(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not is_fhir_id(value):
                raise ValueError(f"patient {value!r} is not a FHIR id (Patient ids, without 'Patient/')")
        return values


class Registry(BaseModel):
    """All registered clients and users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: tuple[ClientEntry, ...] = ()
    users: tuple[UserEntry, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        for kind, names in (
            ("client_id", [c.client_id for c in self.clients]),
            ("username", [u.username for u in self.users]),
        ):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{kind} {', '.join(map(repr, repeated))} registered more than once")
        return self

    def client(self, client_id: str) -> ClientEntry | None:
        return next((c for c in self.clients if c.client_id == client_id), None)

    def user(self, username: str) -> UserEntry | None:
        return next((u for u in self.users if u.username == username), None)

    def user_compartments(self, username: str | None) -> frozenset[str] | None:
        """The patients a `user/` scope reaches for this user: their list, None for an `all_patients`
        user, and none at all for a name the registry does not hold (a removed user's token)."""
        user = self.user(username) if username else None
        if user is None:
            return frozenset()
        return None if user.all_patients else frozenset(user.patients)


def _validate(data: Any, source: Path) -> Registry:
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error["loc"], error["msg"], data) for error in exc.errors())
        raise RegistryError(f"{source}: {problems}") from None


def _describe(loc: tuple[int | str, ...], message: str, data: Any) -> str:
    where = _path(loc[:2])
    if len(loc) >= 2 and loc[0] in ("clients", "users") and isinstance(loc[1], int):
        name_field = "client_id" if loc[0] == "clients" else "username"
        try:
            name = data[loc[0]][loc[1]].get(name_field)
        except (AttributeError, IndexError, KeyError, TypeError):
            name = None
        if name is not None:
            where += f" ({name_field} {name!r})"
    if len(loc) > 2:
        where += "." + _path(loc[2:])
    message = message.removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _path(loc: tuple[int | str, ...]) -> str:
    where = ""
    for item in loc:
        where += f"[{item}]" if isinstance(item, int) else (f".{item}" if where else str(item))
    return where


def load_registry(path: Path) -> Registry:
    """Read and validate the registry file; RegistryError names the file and the bad entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryError(f"{path}: cannot be read: {exc}") from exc
    except ValueError as exc:
        raise RegistryError(f"{path}: not JSON: {exc}") from None
    return _validate(data, path)


def _serialise(registry: Registry) -> str:
    return json.dumps(registry.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2) + "\n"


def _temporary_copy(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".auth-clients-", dir=path.parent)  # mode 0600
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return temporary


def write_registry(path: Path, registry: Registry) -> None:
    """Replace the registry file atomically (mode 0600: it holds password hashes)."""
    temporary = _temporary_copy(path, _serialise(registry))
    os.replace(temporary, path)


def create_demo_registry(path: Path) -> Registry:
    """Write the demo registry to ``path`` unless a file is already there (then read that one).

    The demo user's random password is logged once at WARNING; only its hash is stored.
    """
    password = secrets.token_urlsafe(12)
    registry = Registry(
        clients=(
            ClientEntry(
                client_id=DEMO_CLIENT_ID,
                name=DEMO_CLIENT_NAME,
                kind="public",
                redirect_uris=DEMO_REDIRECT_URIS,
                scope=DEMO_SCOPE,
            ),
        ),
        users=(
            UserEntry(
                username=DEMO_USERNAME,
                password_hash=hash_secret(password),
                fhir_user=DEMO_FHIR_USER,
                patients=DEMO_PATIENTS,
            ),
        ),
    )
    temporary = _temporary_copy(path, _serialise(registry))
    try:
        os.link(temporary, path)  # fails if the file appeared meanwhile: never overwrite a registry
    except FileExistsError:
        return load_registry(path)
    finally:
        os.unlink(temporary)
    log.warning(
        "Created the demo client registry %s: client %r, user %r with password %r "
        "(shown only now; only its hash is stored)",
        path,
        DEMO_CLIENT_ID,
        DEMO_USERNAME,
        password,
    )
    return registry


def load_or_create_registry(path: Path) -> Registry:
    """The registry at ``path``, or a new demo registry there when the file does not exist."""
    if not path.exists():
        return create_demo_registry(path)
    return load_registry(path)


def with_clients(registry: Registry, clients: Iterable[ClientEntry]) -> Registry:
    """The registry with `clients` added in memory (the file is not changed): clients the facade
    registers itself, derived from its settings at every start (the SMART app at /app, ADR 0043).
    A client_id the file registers already keeps the file's entry: the operator's word wins."""
    added = []
    for client in clients:
        if registry.client(client.client_id) is not None:
            log.info("Client %r: the registry file's entry is used, not the built-in one", client.client_id)
        else:
            added.append(client)
    return registry.model_copy(update={"clients": (*registry.clients, *added)}) if added else registry


def register_backend_client(
    path: Path,
    client_id: str,
    jwks: dict[str, Any],
    scope: str,
    *,
    name: str | None = None,
    jwks_url: str | None = None,
) -> ClientEntry:
    """Add a SMART Backend Services client with its public key set (``{"keys": [...]}``) to the registry
    at ``path`` (created when absent). Refuses a client_id that is already registered. The running
    server reads the file at start-up, so restart it afterwards."""
    current = load_registry(path) if path.exists() else Registry()
    if current.client(client_id) is not None:
        raise RegistryError(f"{path}: client_id {client_id!r} is already registered")
    entry: dict[str, Any] = {"client_id": client_id, "kind": "backend-service", "scope": scope, "jwks": jwks}
    if name is not None:
        entry["name"] = name
    if jwks_url is not None:
        entry["jwks_url"] = jwks_url
    data = current.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["clients"].append(entry)
    updated = _validate(data, path)
    write_registry(path, updated)
    added = updated.client(client_id)
    assert added is not None
    return added


def set_user_password(path: Path, username: str, password: str) -> UserEntry:
    """Replace the password of a registered user (e.g. ``demo``, whose password is logged only when
    the registry is first written) with the hash of ``password``. The running server reads the file
    at start-up, so restart it afterwards; a lockout of the user (ADR 0011) ends with the restart too."""
    if not password:
        raise RegistryError("the new password is empty")
    current = load_registry(path)
    user = current.user(username)
    if user is None:
        known = ", ".join(repr(u.username) for u in current.users) or "none"
        raise RegistryError(f"{path}: no user {username!r} (users: {known})")
    changed = user.model_copy(update={"password_hash": hash_secret(password)})
    users = tuple(changed if u.username == username else u for u in current.users)
    write_registry(path, current.model_copy(update={"users": users}))
    return changed
