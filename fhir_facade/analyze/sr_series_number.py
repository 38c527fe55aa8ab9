"""The Series Number of a new AI result series: the next one from 9901 up in its study.

Each analysis writes its SR as a new series of the analysed study (ADR 0006). Viewers list a
study's series by Series Number (0020,0011), so every result series gets its own number: 9901 for
the first, then one more than the highest number of 9901 or above already in the study (found by
QIDO-RS at series level just before the SR is built), so the newest result is listed last and a
re-analysis never shows up as a second "9901". Numbers below 9901 are the scanner's and never
counted. Series Number is IS (PS3.5 6.2), not unique by rule (PS3.3 C.7.3.1), so a number taken
by two concurrent writers in different processes is harmless, just less tidy; within one process
`Analyzer` takes numbers one at a time (docs/adr/0020-first-hour.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fhir_facade.analyze.dicom_sr import FIRST_AI_SERIES_NUMBER
from fhir_facade.dicomweb.client import DicomwebClient
from fhir_facade.dicomweb.query import tag_values

__all__ = ["FIRST_AI_SERIES_NUMBER", "SERIES_NUMBER_TAG", "next_series_number", "study_next_series_number"]

SERIES_NUMBER_TAG = "00200011"


def next_series_number(series: Iterable[dict[str, Any]], first: int = FIRST_AI_SERIES_NUMBER) -> int:
    """`first`, or one more than the highest Series Number >= `first` among QIDO series results."""
    taken = [first - 1]
    for item in series:
        for value in tag_values(item, SERIES_NUMBER_TAG):
            try:
                number = int(str(value).strip())  # IS: a decimal string; Orthanc sends a number
            except ValueError:
                continue  # a malformed value in the PACS is not ours to fix, nor to count
            if number >= first:
                taken.append(number)
    return max(taken) + 1


async def study_next_series_number(qido: DicomwebClient, study_uid: str) -> int:
    """The Series Number for a new result series of `study_uid`, from one QIDO-RS series query
    (PS3.18 10.6.1; SeriesNumber is a default return attribute, asked for anyway)."""
    series = await qido.search_series({"StudyInstanceUID": study_uid}, include_fields=(SERIES_NUMBER_TAG,))
    return next_series_number(series)
