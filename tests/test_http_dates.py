"""HTTP dates as RFC 9110 5.6.7 writes them and Retry-After in both of its forms (10.2.3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from fhir_facade.fhir.write_interactions import version_headers
from fhir_facade.http_dates import http_date, parse_http_date, retry_after_seconds

RFC_EXAMPLE = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)  # RFC 9110 5.6.7's own example


def test_an_http_date_is_an_imf_fixdate_in_gmt() -> None:
    assert http_date(RFC_EXAMPLE) == "Sun, 06 Nov 1994 08:49:37 GMT"
    berlin = RFC_EXAMPLE.astimezone(timezone(timedelta(hours=1)))
    assert http_date(berlin) == "Sun, 06 Nov 1994 08:49:37 GMT"  # not "09:49:37 +0100"
    assert http_date(RFC_EXAMPLE.replace(tzinfo=None)) == "Sun, 06 Nov 1994 08:49:37 GMT"


def test_last_modified_is_sent_in_gmt() -> None:
    resource = {
        "resourceType": "Task",
        "id": "a",
        "meta": {"versionId": "1", "lastUpdated": "1994-11-06T09:49:37.250+01:00"},
    }
    assert version_headers(resource, "http://x/fhir")["Last-Modified"] == "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_the_three_http_date_forms_are_read(value: str) -> None:
    """IMF-fixdate, and the obsolete RFC 850 and asctime forms a recipient must still accept."""
    assert parse_http_date(value) == RFC_EXAMPLE


@pytest.mark.parametrize("value", ["", "yesterday", "12", "Sun, 06 Nov 1994"])
def test_what_is_no_http_date(value: str) -> None:
    assert parse_http_date(value) is None


def test_retry_after_as_delay_seconds() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(" 0 ") == 0.0


def test_retry_after_as_an_http_date() -> None:
    now = RFC_EXAMPLE - timedelta(seconds=90)
    assert retry_after_seconds("Sun, 06 Nov 1994 08:49:37 GMT", now) == 90.0
    assert retry_after_seconds("Sun, 06 Nov 1994 08:49:37 GMT", now + timedelta(hours=1)) == 0.0  # passed


@pytest.mark.parametrize("value", [None, "", "-5", "1.5", "soon", "٣"])
def test_retry_after_that_is_neither_form(value: str | None) -> None:
    assert retry_after_seconds(value) is None
