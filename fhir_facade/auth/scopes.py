"""SMART on FHIR scopes: parse an access token's ``scope`` and answer "may this request do X to type T?".

SMART App Launch 2.x, scopes-and-launch-context.html ("Scopes for requesting FHIR resources"):

- v2: ``(patient|user|system)/(Type|*).[c][r][u][d][s][?param=value&...]``: the letters appear in the
  order c, r, u, d, s, each at most once, at least one; the optional query narrows the grant to
  resources that match those search parameters (e.g. ``patient/Observation.rs?category=laboratory``).
- v1 (still accepted, "Scopes for requesting clinical data" in 1.0): ``.read`` = ``rs``,
  ``.write`` = ``cud``, ``.*`` = ``cruds``.
- Everything else (``openid``, ``fhirUser``, ``launch``, ``launch/patient``, ``offline_access``,
  ``online_access``, ...) grants no resource access and is kept only for the record.

This module is pure: no tokens, no HTTP. The caller (the auth dependency) decides what a token with a
malformed scope means and applies patient-compartment confinement when only ``patient/`` grants.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import parse_qsl, quote

__all__ = [
    "CONTEXTS",
    "Context",
    "Interaction",
    "InvalidScope",
    "Query",
    "ResourceScope",
    "Scopes",
    "parse_scope",
    "parse_scopes",
    "requirements_for_analyze",
]

#: Who the access is for: the patient in context, the signed-in user, or a backend service.
Context = Literal["patient", "user", "system"]
CONTEXTS: tuple[Context, ...] = ("patient", "user", "system")

Query = tuple[tuple[str, str], ...]


class Interaction(enum.Enum):
    """What a request does to a resource type, as one SMART v2 permission letter.

    Declared in the order the letters must appear in a v2 scope (c, r, u, d, s).
    """

    CREATE = "c"
    READ = "r"
    UPDATE = "u"
    DELETE = "d"
    SEARCH = "s"

    @classmethod
    def from_fhir(cls, code: str) -> Interaction:
        """The permission a FHIR R4 restful interaction (codesystem-restful-interaction) needs.

        SMART 2.x maps ``read``, ``vread`` and ``history-instance`` to r, ``search-type`` and
        ``history-type`` to s, ``update`` and ``patch`` to u. System-wide interactions (``search-system``,
        ``history-system``, ``transaction``, ``batch``) span types, so they are refused here: the caller
        checks each type (or each entry) it touches instead.
        """
        try:
            return _FHIR_INTERACTIONS[code]
        except KeyError:
            raise ValueError(
                f"interaction {code!r} has no single-type SMART permission; "
                f"expected one of {', '.join(sorted(_FHIR_INTERACTIONS))}"
            ) from None


_FHIR_INTERACTIONS: dict[str, Interaction] = {
    "read": Interaction.READ,
    "vread": Interaction.READ,
    "history-instance": Interaction.READ,
    "search-type": Interaction.SEARCH,
    "history-type": Interaction.SEARCH,
    "create": Interaction.CREATE,
    "update": Interaction.UPDATE,
    "patch": Interaction.UPDATE,
    "delete": Interaction.DELETE,
}

_LETTERS = "".join(i.value for i in Interaction)  # "cruds", the required order
_BY_LETTER = {i.value: i for i in Interaction}
_V1_PERMISSIONS: dict[str, frozenset[Interaction]] = {
    "read": frozenset({Interaction.READ, Interaction.SEARCH}),
    "write": frozenset({Interaction.CREATE, Interaction.UPDATE, Interaction.DELETE}),
    "*": frozenset(Interaction),
}
# A FHIR resource type name (R4 ResourceType codes are UpperCamelCase ASCII letters).
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]*")
# Tokens that are meant as resource scopes even when malformed: a SMART context prefix, or any
# `word/Type.` shape (so `doctor/Observation.r` is an error, not silently ignored). `launch/patient`,
# `openid` and URL-shaped scopes from other APIs do not match.
_RESOURCE_SHAPED = re.compile(r"(?:patient|user|system)/|[A-Za-z]+/(?:\*|[A-Za-z]+)\.")


class InvalidScope(ValueError):
    """A token that is meant as a resource scope but breaks the SMART grammar.

    Raised rather than ignored: silently dropping ``patient/Observation.rr`` would hide a broken
    authorization server or client from the people who must fix it.
    """

    def __init__(self, scope: str, reason: str) -> None:
        super().__init__(f"invalid SMART scope {scope!r}: {reason}")
        self.scope = scope
        self.reason = reason


@dataclass(frozen=True)
class ResourceScope:
    """One resource scope, v1 or v2, in v2 terms.

    ``query`` holds the ``?param=value`` pairs (decoded, sorted) that narrow the grant; empty = no
    narrowing.
    """

    context: Context
    resource_type: str
    permissions: frozenset[Interaction]
    query: Query = ()

    def __post_init__(self) -> None:
        # Validate early (constructed directly as well as by parse_scope) and name the bad field.
        where = f"{self.context}/{self.resource_type}"
        if self.context not in CONTEXTS:
            raise InvalidScope(where, f"context {self.context!r} is not one of {', '.join(CONTEXTS)}")
        if self.resource_type != "*" and not _TYPE_NAME.fullmatch(self.resource_type):
            raise InvalidScope(where, f"resource_type {self.resource_type!r} is not a FHIR type name or '*'")
        if not self.permissions or not all(isinstance(p, Interaction) for p in self.permissions):
            raise InvalidScope(where, "permissions must be a non-empty set of Interaction")
        for name, value in self.query:
            if not name or not value:
                raise InvalidScope(where, f"query parameter {name!r}={value!r} needs a name and a value")

    def grants(self, interaction: Interaction, resource_type: str) -> bool:
        """Whether this scope covers ``interaction`` on ``resource_type`` (ignoring its query)."""
        return interaction in self.permissions and self.resource_type in ("*", resource_type)

    @property
    def text(self) -> str:
        """The scope in normalised v2 form, e.g. ``patient/Observation.rs?category=laboratory``."""
        letters = "".join(i.value for i in Interaction if i in self.permissions)
        text = f"{self.context}/{self.resource_type}.{letters}"
        if self.query:
            text += "?" + "&".join(f"{_quote(n)}={_quote(v)}" for n, v in self.query)
        return text


def _quote(part: str) -> str:
    # Keep token values such as `http://terminology.hl7.org/CodeSystem/observation-category|laboratory`
    # readable; escape only what would break the scope (space, '&', '=', '?', '%', '#').
    return quote(part, safe=":/|,.-_~*$")


def parse_scope(text: str) -> ResourceScope | None:
    """Parse one scope token: a ResourceScope, or None for a non-resource scope (``openid``,
    ``launch/patient``...).

    Raises InvalidScope for a malformed resource scope: unknown context, bad type name, no
    permissions, unknown/repeated/out-of-order letters, or a bad ``?query``.
    """
    if not _RESOURCE_SHAPED.match(text):
        return None
    context, _, rest = text.partition("/")
    if context not in CONTEXTS:
        raise InvalidScope(text, f"unknown context {context!r}; expected one of {', '.join(CONTEXTS)}")
    target, dot, rest = rest.partition(".")
    if not dot:
        raise InvalidScope(text, "expected '<Type|*>.<permissions>' after the context")
    if target != "*" and not _TYPE_NAME.fullmatch(target):
        raise InvalidScope(text, f"{target!r} is not a FHIR resource type name or '*'")
    letters, question, query_text = rest.partition("?")
    if letters in _V1_PERMISSIONS:
        if question:
            raise InvalidScope(text, f"a v1 scope (.{letters}) takes no '?' query; use v2 letters")
        permissions = _V1_PERMISSIONS[letters]
    else:
        permissions = _parse_letters(text, letters)
    query = _parse_query(text, query_text) if question else ()
    return ResourceScope(cast(Context, context), target, permissions, query)


def _parse_letters(scope: str, letters: str) -> frozenset[Interaction]:
    if not letters:
        raise InvalidScope(scope, "no permissions after '.'; expected letters from 'cruds'")
    previous = -1
    for letter in letters:
        position = _LETTERS.find(letter)
        if position < 0:
            raise InvalidScope(scope, f"unknown permission {letter!r}; expected letters from 'cruds'")
        if position == previous:
            raise InvalidScope(scope, f"permission {letter!r} repeated")
        if position < previous:
            raise InvalidScope(
                scope, f"permission {letter!r} out of order; letters go in the order c, r, u, d, s"
            )
        previous = position
    return frozenset(_BY_LETTER[letter] for letter in letters)


def _parse_query(scope: str, query_text: str) -> Query:
    if not query_text:
        raise InvalidScope(scope, "'?' is not followed by name=value pairs")
    try:
        pairs = parse_qsl(query_text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidScope(scope, f"query {query_text!r} is not name=value pairs joined by '&'") from None
    for name, value in pairs:
        if not name or not value:
            raise InvalidScope(scope, f"query parameter {name!r}={value!r} needs a name and a value")
    # Search parameters are ANDed regardless of order; sorting makes equal scopes compare equal.
    return tuple(sorted(pairs))


def parse_scopes(text: str) -> Scopes:
    """Parse a space-separated ``scope`` (RFC 6749 3.3) into Scopes.

    One malformed resource scope makes the whole string invalid (InvalidScope): a token endpoint
    answers ``invalid_scope``, a resource server treats the token as invalid.
    """
    resources: list[ResourceScope] = []
    other: list[str] = []
    for token in text.split():
        scope = parse_scope(token)
        if scope is None:
            if token not in other:
                other.append(token)
        elif scope not in resources:
            resources.append(scope)
    return Scopes(tuple(resources), tuple(other))


@dataclass(frozen=True)
class Scopes:
    """The scopes granted to one access token, and the questions the authorization check asks."""

    resources: tuple[ResourceScope, ...] = ()
    #: Non-resource scopes (openid, fhirUser, launch/patient, offline_access...), in the order given.
    other: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The scopes as a ``scope`` string (v2 spelling) that ``parse_scopes`` reads back as equal."""
        return " ".join([*(s.text for s in self.resources), *self.other])

    def granting(self, interaction: Interaction, resource_type: str) -> tuple[ResourceScope, ...]:
        """The resource scopes that grant ``interaction`` on ``resource_type``."""
        return tuple(s for s in self.resources if s.grants(interaction, resource_type))

    def allows(self, interaction: Interaction, resource_type: str) -> bool:
        """Whether any scope grants it (possibly only for the patient in context, or narrowed by a query:
        see ``contexts_for`` and ``query_restrictions``)."""
        return bool(self.granting(interaction, resource_type))

    def contexts_for(self, interaction: Interaction, resource_type: str) -> frozenset[Context]:
        """Which of patient/user/system grant it. ``{"patient"}`` alone means the caller must confine the
        request to the patient-in-context's compartment; empty means denied."""
        return frozenset(s.context for s in self.granting(interaction, resource_type))

    def query_restrictions(
        self, interaction: Interaction, resource_type: str, *, context: Context | None = None
    ) -> list[Query]:
        """The ``?query`` parts of the scopes that grant it (optionally only those of one context).

        A resource passes if it matches ANY of them; an empty list means no restriction because some
        granting scope has no query. Pass ``context`` when several contexts grant it, since
        ``patient/Observation.rs user/Observation.rs?category=laboratory`` leaves the user-level grant
        narrowed. Raises ValueError when nothing grants it, so a forgotten ``allows`` check fails
        closed instead of reading as "unrestricted".
        """
        granting = [
            s for s in self.granting(interaction, resource_type) if context is None or s.context == context
        ]
        if not granting:
            where = f" in context {context!r}" if context else ""
            raise ValueError(f"no scope grants {interaction.name} on {resource_type}{where}")
        if any(not s.query for s in granting):
            return []
        restrictions: list[Query] = []
        for scope in granting:
            if scope.query not in restrictions:
                restrictions.append(scope.query)
        return restrictions

    @property
    def granted_text(self) -> str:
        """All scopes, resource scopes in normalised v2 form, sorted and de-duplicated: for logs and
        audit, where ``patient/Observation.read`` and ``patient/Observation.rs`` should read the same."""
        return " ".join(sorted({s.text for s in self.resources} | set(self.other)))

    def missing_scope_for(self, interaction: Interaction, resource_type: str) -> str:
        """A scope that WOULD grant it, for the 403 ``insufficient_scope`` error description.

        Uses the context the token already works in (patient, else user, else system, among its resource
        scopes; ``patient`` when ``launch/patient`` was granted; else ``user``), so the hint fits the
        kind of app. Read and search are suggested together (``.rs``, the usual read-only grant); the
        write permissions one by one. The suggestion is unrestricted even if a narrowed scope already
        grants it.
        """
        letters = "rs" if interaction in (Interaction.READ, Interaction.SEARCH) else interaction.value
        return f"{self._suggested_context()}/{resource_type}.{letters}"

    def _suggested_context(self) -> Context:
        held = {s.context for s in self.resources}
        for context in CONTEXTS:
            if context in held:
                return context
        return "patient" if "launch/patient" in self.other else "user"


def requirements_for_analyze() -> list[tuple[Interaction, str]]:
    """What ``POST ImagingStudy/{id}/$analyze`` needs: read on the study, create on DiagnosticReport.

    The operation also stores the finding Observations, the algorithm Device, a Provenance (and, when
    async, a job Task) and writes a DICOM SR to the PACS. Those are made by the server, on its own
    authority, as parts of the one report the caller asked for: the Device and Provenance describe the
    server's algorithm and action, and the Observations are the report's results. Requiring create on
    them too would push every app that runs an analysis to ask for write access it never uses
    directly, against least privilege. Reading them afterwards still needs their own read scopes.
    """
    return [(Interaction.READ, "ImagingStudy"), (Interaction.CREATE, "DiagnosticReport")]
