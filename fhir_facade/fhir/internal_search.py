"""Typed reads and searches for the server's own code (ADR 0025).

Internal callers (the watcher, the analysis worklist, authorization, the order worklist, the
wiring) used to build FHIR search parameter strings by hand for `parse_search`, each escaping (or
not) on its own. `SearchBuilder` is the one way: each value is escaped once here (FHIR R4
search.html#escaping: `\\`, `,`, `$` and `|` inside a value), the request is validated against the
provider's parameters as a client's would be (strict, so a typo fails loudly), and paging is explicit.
`read_or_none` is the read that treats "not there" as None.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchRequest, parse_search

__all__ = ["SearchBuilder", "escape_value", "read_or_none"]

#: Statuses of a read that mean "no such resource (any more)": FHIR http.html#read.
_ABSENT = (404, 410)


def escape_value(value: str) -> str:
    """One search value with FHIR's special characters escaped (search.html#escaping)."""
    for char in ("\\", ",", "$", "|"):
        value = value.replace(char, f"\\{char}")
    return value


async def read_or_none(
    provider: ResourceProvider, resource_id: str, *, also_absent: Iterable[int] = ()
) -> dict[str, Any] | None:
    """`provider.read`, with None for a resource that does not exist or was deleted (404, 410).
    `also_absent` adds statuses to treat the same way (e.g. 403 for a resource the caller may not
    see, which an `_include` leaves out)."""
    try:
        return await provider.read(resource_id)
    except FhirError as error:
        if error.status in _ABSENT or error.status in tuple(also_absent):
            return None
        raise


class SearchBuilder:
    """A search on one provider, built parameter by parameter:
    `SearchBuilder(tasks).where_token("code", SYSTEM, "analyze").where_any("status", ("ready",)).count(5)`.
    Repeated parameters are ANDed, the values of one `where_any` ORed (search.html#combining)."""

    def __init__(self, provider: ResourceProvider, *, base_url: str = "") -> None:
        self._provider = provider
        self._base_url = base_url
        self._params: list[tuple[str, str]] = []
        self._count = 1

    def where(self, name: str, value: str) -> Self:
        """`name` equals/matches `value` (taken literally: escaped here)."""
        self._params.append((name, escape_value(value)))
        return self

    def where_any(self, name: str, values: Iterable[str]) -> Self:
        """`name` matches one of `values`."""
        self._params.append((name, ",".join(escape_value(v) for v in values)))
        return self

    def where_token(self, name: str, system: str | None, code: str) -> Self:
        """A token `system|code` (search.html#token); `system` None matches any system."""
        value = escape_value(code) if system is None else f"{escape_value(system)}|{escape_value(code)}"
        self._params.append((name, value))
        return self

    def sort(self, *keys: str) -> Self:
        """`_sort` (search.html#sort): names, `-` for descending; the provider must support them."""
        self._params.append(("_sort", ",".join(keys)))
        return self

    def count(self, count: int) -> Self:
        """The page size: how many matches the caller wants at most."""
        self._count = max(count, 1)
        return self

    @property
    def params(self) -> list[tuple[str, str]]:
        """The parameters so far (the criteria of a conditional write, fhir/conditional_guard.py)."""
        return list(self._params)

    def request(self) -> SearchRequest:
        """The SearchRequest, validated against the provider's search parameters."""
        return parse_search(
            self._provider.resource_type,
            self._params,
            self._provider.search_param_map,
            base_url=self._base_url,
            strict=True,
            default_count=self._count,
            max_count=self._count,
            sortable=self._provider.sortable,
        )

    async def matches(self) -> list[dict[str, Any]]:
        """The matching resources (at most `count`)."""
        return (await self._provider.search(self.request())).matches
