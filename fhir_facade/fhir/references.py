"""Literal references (FHIR R4 references.html#literal), parsed in one place.

A `Reference.reference` is one of: relative `Type/id` or `Type/id/_history/vid`; absolute, on this
server's base (the same resource, written out) or on another server; `#id`, a contained resource
(references.html#contained); or a `urn:uuid:`/`urn:oid:` placeholder, which only means something
inside a Bundle (bundle.html#references). Everything that follows a reference asks `parse_reference`
rather than splitting on "/" itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fhir_facade.fhir.ids import FHIR_ID_PATTERN, RESOURCE_TYPE_PATTERN

__all__ = ["Reference", "ReferenceKind", "local_target", "parse_reference"]

# references.html#literal (the regex under "Literal References"), without the base.
_RESTFUL: Final = re.compile(
    rf"(?P<type>{RESOURCE_TYPE_PATTERN})/(?P<id>{FHIR_ID_PATTERN})(?:/_history/(?P<version>{FHIR_ID_PATTERN}))?"
)


class ReferenceKind(StrEnum):
    """What a literal reference points at."""

    LOCAL = "local"  # a resource on this server: relative, or absolute on our base
    EXTERNAL = "external"  # an absolute URL elsewhere
    CONTAINED = "contained"  # `#id`: a resource inside the referring one
    URN = "urn"  # `urn:uuid:` / `urn:oid:`: a Bundle-internal placeholder
    INVALID = "invalid"  # none of the above (e.g. `Patient/` or `patient/1`)


@dataclass(frozen=True)
class Reference:
    """A parsed literal reference; `resource_type`/`id`/`version` are set when the reference (or the
    path of an absolute URL) has the RESTful shape `Type/id[/_history/vid]`. For a contained
    reference `id` is the contained resource's id."""

    raw: str
    kind: ReferenceKind
    resource_type: str | None = None
    id: str | None = None
    version: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind is ReferenceKind.LOCAL

    @property
    def relative(self) -> str | None:
        """`Type/id` (without version) when the reference names a resource by type and id."""
        return f"{self.resource_type}/{self.id}" if self.resource_type and self.id else None


def _restful(raw: str, path: str, kind: ReferenceKind) -> Reference:
    match = _RESTFUL.fullmatch(path)
    if match is None:
        return Reference(raw, ReferenceKind.INVALID if kind is ReferenceKind.LOCAL else kind)
    return Reference(raw, kind, match["type"], match["id"], match["version"])


def parse_reference(reference: str, base_url: str | None = None) -> Reference:
    """Parse `reference`. `base_url` is this server's base (FHIR http.html#root): an absolute
    reference under it is LOCAL, as its relative form is (references.html#literal: "the reference
    is to the same resource")."""
    if reference.startswith("#"):
        contained = reference[1:]
        return Reference(reference, ReferenceKind.CONTAINED, id=contained or None)
    if reference.startswith("urn:"):
        return Reference(reference, ReferenceKind.URN)
    if base_url:
        prefix = base_url.rstrip("/") + "/"
        if reference.startswith(prefix):
            return _restful(reference, reference[len(prefix) :], ReferenceKind.LOCAL)
    if "://" in reference:
        # Another server: its RESTful tail still names type and id (e.g. for display or _include
        # refusal), but never a resource here.
        scheme_less = reference.split("://", 1)[1].split("?", 1)[0]
        segments = scheme_less.split("/")
        for tail in (segments[-4:], segments[-2:]):
            candidate = _RESTFUL.fullmatch("/".join(tail)) if len(segments) > len(tail) else None
            if candidate is not None:
                return Reference(
                    reference,
                    ReferenceKind.EXTERNAL,
                    candidate["type"],
                    candidate["id"],
                    candidate["version"],
                )
        return Reference(reference, ReferenceKind.EXTERNAL)
    return _restful(reference, reference, ReferenceKind.LOCAL)


def local_target(reference: str, base_url: str | None = None) -> tuple[str, str] | None:
    """(type, id) of the resource on this server `reference` names (a versioned reference names its
    resource), or None for contained, placeholder, external and malformed references."""
    parsed = parse_reference(reference, base_url)
    if parsed.is_local and parsed.resource_type and parsed.id:
        return parsed.resource_type, parsed.id
    return None
