"""Generated narrative (R4 narrative.html): the human-readable `text` of a resource, built from a few
structured parts so that no caller writes markup.

R4 says a resource "SHOULD" carry a narrative (dom-6) so that a person can read it where the
system that receives it does not understand every element (narrative.html#Narrative). The rules
kept here, once for every resource type:

- `div` is one XHTML `<div>` in the namespace http://www.w3.org/1999/xhtml, with non-whitespace
  content (txt-2), made only of basic formatting elements (txt-1): here `h1`-`h6`, `p`, `b`,
  `table`/`tr`/`th`/`td`, `ul`/`li` and no attribute but `class` on the outer div. No script,
  no event attribute, no link, no image, no style: nothing of the input ever becomes markup.
- Every value is escaped with `html.escape` (`<`, `>`, `&`, quotes), and the characters XML 1.0
  cannot carry (C0 controls but tab, newline, carriage return) are dropped, so a DICOM or client
  string can never break the document or inject an element.
- `status` is `generated` ("The contents of the narrative are entirely generated from the
  core elements in the content", valueset-narrative-status.html).
- The outer div carries `class="fhir-facade-narrative"`, so the facade can tell its own
  narrative (regenerated when it changes a resource it owns, e.g. a Task moving to `completed`)
  from one a client supplied, which it never overwrites (`with_narrative`; ADR 0019).

Resource-agnostic: what each type's narrative says lives next to the code that builds the type.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ALLOWED_ELEMENTS",
    "MARKER_CLASS",
    "XHTML_NAMESPACE",
    "Facts",
    "Heading",
    "Items",
    "Paragraph",
    "Part",
    "Table",
    "is_facade_narrative",
    "joined",
    "narrative",
    "reference_text",
    "with_narrative",
]

XHTML_NAMESPACE: Final = "http://www.w3.org/1999/xhtml"
#: class of the outer div of every narrative the facade generates.
MARKER_CLASS: Final = "fhir-facade-narrative"
#: Every element this module can emit (a subset of R4's txt-1 list).
ALLOWED_ELEMENTS: Final = frozenset(
    {"div", "h1", "h2", "h3", "h4", "h5", "h6", "p", "b", "table", "tr", "th", "td", "ul", "li"}
)
_OPEN: Final = f'<div xmlns="{XHTML_NAMESPACE}" class="{MARKER_CLASS}">'
#: Characters XML 1.0 does not allow (section 2.2): C0 controls except TAB, LF, CR; U+FFFE/U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
#: The elements before `text` in every DomainResource (resource.html, domainresource.html).
_BEFORE_TEXT: Final = ("resourceType", "id", "meta", "implicitRules", "language")


def _escaped(value: object) -> str:
    return html.escape(_NOT_XML.sub("", str(value)), quote=True)


@dataclass(frozen=True)
class Heading:
    """A title (`h1`-`h6`)."""

    text: str
    level: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 6:
            raise ValueError(f"level must be 1-6, not {self.level}")

    def html(self) -> str:
        return f"<h{self.level}>{_escaped(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class Paragraph:
    """A paragraph, optionally led by a bold label (`<p><b>Impression:</b> ...</p>`) or all bold."""

    text: str
    label: str | None = None
    strong: bool = False

    def html(self) -> str:
        body = f"<b>{_escaped(self.text)}</b>" if self.strong else _escaped(self.text)
        lead = f"<b>{_escaped(self.label)}</b> " if self.label else ""
        return f"<p>{lead}{body}</p>"


@dataclass(frozen=True)
class Facts:
    """Label/value pairs as a two-column table; pairs without a value (None, "") are left out."""

    rows: Sequence[tuple[str, object | None]]

    def present(self) -> list[tuple[str, object]]:
        return [(label, value) for label, value in self.rows if value is not None and value != ""]

    def html(self) -> str:
        rows = "".join(f"<tr><th>{_escaped(k)}</th><td>{_escaped(v)}</td></tr>" for k, v in self.present())
        return f"<table>{rows}</table>" if rows else ""


@dataclass(frozen=True)
class Table:
    """A table with a header row."""

    header: Sequence[str]
    rows: Sequence[Sequence[object]]

    def html(self) -> str:
        if not self.rows:
            return ""
        head = "".join(f"<th>{_escaped(cell)}</th>" for cell in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{_escaped(c)}</td>" for c in row) + "</tr>" for row in self.rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"


@dataclass(frozen=True)
class Items:
    """A bulleted list; empty items are left out."""

    items: Sequence[str]

    def html(self) -> str:
        items = "".join(f"<li>{_escaped(item)}</li>" for item in self.items if item)
        return f"<ul>{items}</ul>" if items else ""


Part = Heading | Paragraph | Facts | Table | Items


def narrative(*parts: Part | None) -> dict[str, str]:
    """A generated R4 Narrative from `parts` in order (None parts are skipped). Raises ValueError
    when nothing would be said: txt-2 requires non-whitespace content."""
    body = "".join(part.html() for part in parts if part is not None)
    if not re.sub(r"<[^>]*>", "", body).strip():
        raise ValueError("a narrative needs some content (FHIR txt-2)")
    return {"status": "generated", "div": f"{_OPEN}{body}</div>"}


def is_facade_narrative(text: object) -> bool:
    """Whether `text` (a resource's `text` element) is a narrative this module generated."""
    return (
        isinstance(text, Mapping)
        and text.get("status") == "generated"
        and isinstance(text.get("div"), str)
        and text["div"].startswith(_OPEN)
    )


def with_narrative(resource: Mapping[str, Any], text: dict[str, str]) -> dict[str, Any]:
    """`resource` with `text` set to the generated `text`, placed where R4 orders it (after
    resourceType, id, meta, implicitRules, language). A narrative someone else wrote (a client's,
    or any without the facade's marker) is kept as it is: the facade never overwrites it."""
    existing = resource.get("text")
    if existing is not None and not is_facade_narrative(existing):
        return dict(resource)
    head = {key: resource[key] for key in _BEFORE_TEXT if key in resource}
    rest = {key: value for key, value in resource.items() if key not in head and key != "text"}
    return {**head, "text": text, **rest}


def reference_text(reference: Mapping[str, Any] | None) -> str | None:
    """How a narrative names a Reference: its display, with the literal reference after it, or
    whichever of them (or the identifier value) it has."""
    if not isinstance(reference, Mapping):
        return None
    literal = reference.get("reference")
    display = reference.get("display")
    identifier = reference.get("identifier")
    if display and literal:
        return f"{display} ({literal})"
    if display or literal:
        return str(display or literal)
    if isinstance(identifier, Mapping) and identifier.get("value"):
        return str(identifier["value"])
    return None


def joined(values: Iterable[object], separator: str = ", ") -> str | None:
    """Values joined for one table cell; None when there are none."""
    text = separator.join(str(value) for value in values if value not in (None, ""))
    return text or None
