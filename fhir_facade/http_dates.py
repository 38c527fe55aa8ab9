"""HTTP dates (RFC 9110 5.6.7) and Retry-After (RFC 9110 10.2.3), by the standard library's
`email.utils`, which implements the same RFC 5322 date grammar HTTP's IMF-fixdate is a profile of.

- What we send is an IMF-fixdate, always in GMT: "Sun, 06 Nov 1994 08:49:37 GMT". RFC 9110 says
  the zone "MUST" be GMT; `format_datetime(..., usegmt=True)` writes exactly that (and refuses a
  datetime not in UTC, so the moment is converted first).
- What we read is any of the three forms a recipient must accept (IMF-fixdate, the obsolete
  RFC 850 and asctime forms): `parsedate_to_datetime` reads all three.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

__all__ = ["http_date", "parse_http_date", "retry_after_seconds"]


def http_date(moment: datetime) -> str:
    """`moment` as an IMF-fixdate in GMT (RFC 9110 5.6.7); a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    """An HTTP-date as an aware datetime, or None when `value` is not one. A date without a zone
    (asctime) is GMT, as RFC 9110 5.6.7 says of every HTTP-date."""
    try:
        moment = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (RFC 9110 10.2.3): delay-seconds (1*DIGIT) or an
    HTTP-date (the wait until then, at least 0). None when absent or neither form."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    moment = parse_http_date(text)
    if moment is None:
        return None
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())
