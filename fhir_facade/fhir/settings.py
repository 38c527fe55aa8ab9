"""The few settings the REST machinery reads, as a protocol (ADR 0025).

`fhir/` must not import `fhir_facade.config` (the wiring depends on the machinery, not the other
way round), so it names only what it needs; `config.Settings` satisfies this structurally.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["JsonLimitSettings", "RestSettings"]


class JsonLimitSettings(Protocol):
    """Bounds on a parsed JSON body (ADR 0010)."""

    @property
    def limits_json_max_depth(self) -> int: ...

    @property
    def limits_json_max_number_length(self) -> int: ...


class RestSettings(Protocol):
    """What the router, the Bundle processor and the write interactions read."""

    @property
    def base_url(self) -> str:
        """The server's base (FHIR http.html#root): Location headers, fullUrls, self links."""
        ...

    @property
    def default_page_size(self) -> int:
        """`_count` when the client sends none (FHIR search.html#count)."""
        ...

    @property
    def max_page_size(self) -> int:
        """The largest `_count` honoured."""
        ...
