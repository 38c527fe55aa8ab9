"""Running a FHIR search as QIDO-RS study queries: shared by the ImagingStudy and Patient providers.

A `StudySearchPlan` is an OR of `QidoQuery` conjunctions plus exact post-filters. When it is a
single query the PACS can answer exactly, paging is pushed down to QIDO (`limit`/`offset`);
otherwise every alternative is fetched, merged, filtered and paged here. Either way the number of
QIDO requests is bounded by the number of alternatives, never by the number of results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import TypeVar

from pydicom.datadict import tag_for_keyword

from fhir_facade.dicomweb import DicomJson, DicomwebClient
from fhir_facade.dicomweb.query import QidoQuery, conjoin, tag_values
from fhir_facade.fhir.errors import FhirError, Issue

__all__ = ["StudyPage", "StudySearchPlan", "dicom_tag", "study_uid"]

#: A plan may fan out into at most this many QIDO queries (OR of different attributes).
MAX_ALTERNATIVES = 16

PostFilter = Callable[[DicomJson], bool]
T = TypeVar("T")


@cache
def dicom_tag(keyword: str) -> str:
    """DICOM JSON key (8 hex digits) for a keyword, from pydicom's data dictionary."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def study_uid(ds: DicomJson) -> str:
    values = tag_values(ds, dicom_tag("StudyInstanceUID"))
    return str(values[0]) if values else ""


@dataclass
class StudySearchPlan:
    alternatives: list[QidoQuery] = field(default_factory=lambda: [QidoQuery()])
    post_filters: list[PostFilter] = field(default_factory=list)

    def require_any(self, options: Iterable[QidoQuery]) -> None:
        """AND the plan with an OR of `options` (distributes into alternatives)."""
        combined = []
        for current in self.alternatives:
            for option in options:
                merged = conjoin(current, option)
                if merged is not None and merged not in combined:
                    combined.append(merged)
        if len(combined) > MAX_ALTERNATIVES:
            raise FhirError(
                400,
                [
                    Issue(
                        "too-costly",
                        f"The search expands to {len(combined)} PACS queries; "
                        f"at most {MAX_ALTERNATIVES} are allowed. Narrow the OR lists.",
                    )
                ],
            )
        self.alternatives = combined

    def require(self, query: QidoQuery) -> None:
        self.require_any([query])

    def filter(self, post_filter: PostFilter) -> None:
        self.post_filters.append(post_filter)

    def match_nothing(self) -> None:
        self.alternatives = []

    @property
    def pushdown(self) -> bool:
        """Whether QIDO alone answers the plan exactly, so paging can happen in the PACS."""
        return (
            len(self.alternatives) == 1
            and not self.post_filters
            and not self.alternatives[0].widened
            and self.alternatives[0].pageable
        )

    def accepts(self, ds: DicomJson) -> bool:
        return any(q.matches(ds, dicom_tag) for q in self.alternatives) and all(
            f(ds) for f in self.post_filters
        )


@dataclass
class StudyPage:
    studies: list[DicomJson]
    total: int | None
    has_next: bool


def _distinct(studies: Iterable[DicomJson]) -> list[DicomJson]:
    """One entry per Study Instance UID (Orthanc keeps one study per patient+UID pair)."""
    seen: dict[str, DicomJson] = {}
    for ds in studies:
        seen.setdefault(study_uid(ds), ds)
    return list(seen.values())


async def find_all_studies(
    dicomweb: DicomwebClient, plan: StudySearchPlan, include_fields: Iterable[str]
) -> list[DicomJson]:
    """Every study matching the plan, filtered exactly, one per UID, in a stable order."""
    fields = tuple(include_fields)
    results = await asyncio.gather(
        *(dicomweb.search_studies(q.params(), include_fields=fields) for q in plan.alternatives)
    )
    matching = [ds for batch in results for ds in batch if plan.accepts(ds)]
    return sorted(_distinct(matching), key=study_uid)


async def find_study_page(
    dicomweb: DicomwebClient,
    plan: StudySearchPlan,
    include_fields: Iterable[str],
    *,
    count: int,
    offset: int,
    want_total: bool,
    details: Callable[[list[DicomJson]], Awaitable[T]],
    count_exact: Callable[[QidoQuery], Awaitable[int]] | None = None,
) -> tuple[StudyPage, T]:
    """One page of matching studies, the total when wanted, whether more follow, and `details`
    of the page (e.g. its series), fetched concurrently with the count query when one is needed."""
    fields = tuple(include_fields)
    if not plan.alternatives:
        return StudyPage([], 0, False), await details([])
    if not plan.pushdown or count == 0:
        every = await find_all_studies(dicomweb, plan, fields)
        page = every[offset : offset + count]
        return StudyPage(page, len(every), offset + count < len(every)), await details(page)
    query = plan.alternatives[0]
    rows = await dicomweb.search_studies(
        query.params(), include_fields=fields, limit=count + 1, offset=offset
    )
    rows = [ds for ds in rows if plan.accepts(ds)]
    has_next = len(rows) > count
    page = _distinct(rows[:count])
    rows = _distinct(rows)
    if not want_total:
        return StudyPage(page, None, has_next), await details(page)
    if not has_next and (offset == 0 or rows):
        return StudyPage(page, offset + len(rows), has_next), await details(page)
    # The page alone does not tell the total: count with a second query, alongside the details.
    # A pushed-down plan is one exact query, so a PACS-side count (count_exact) gives the same number.
    counting = count_exact(query) if count_exact else _count_by_qido(dicomweb, plan)
    total, page_details = await asyncio.gather(counting, details(page))
    return StudyPage(page, total, has_next), page_details


async def _count_by_qido(dicomweb: DicomwebClient, plan: StudySearchPlan) -> int:
    return len(await find_all_studies(dicomweb, plan, ()))
