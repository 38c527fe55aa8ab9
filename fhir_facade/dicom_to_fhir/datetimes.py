"""DICOM DA/TM/TimezoneOffsetFromUTC -> FHIR date and dateTime (PS3.5 6.2, FHIR datatypes.html).

FHIR requires a time zone offset whenever a dateTime carries a time
(http://hl7.org/fhir/R4/datatypes.html#dateTime), while DICOM times are local and the offset is an
optional separate attribute, TimezoneOffsetFromUTC (0008,0201) (PS3.3 C.12.1.1.8). Without it the
configured zone is applied, DST-aware for that date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo

__all__ = ["fhir_date", "fhir_datetime", "parse_offset", "started_instant", "started_range"]

_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
# PS3.5 6.2 TM: HH, HHMM, HHMMSS, HHMMSS.F{1,6}; the retired ACR-NEMA form has colons.
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


@dataclass(frozen=True)
class _Time:
    value: time
    precision: timedelta
    fraction: str | None


def _parse_date(da: str | None) -> date | None:
    if not da:
        return None
    match = _DA.fullmatch(da.strip())
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def _parse_time(tm: str | None) -> _Time | None:
    if not tm:
        return None
    match = _TM.fullmatch(tm.strip())
    if match is None:
        return None
    hour = int(match[1])
    minute = int(match[2] or 0)
    second = int(match[3] or 0)
    fraction = match[4]
    if hour > 23 or minute > 59 or second > 60:
        return None
    second = min(second, 59)  # PS3.5 allows a leap second (60); Python's time does not
    micro = int(fraction.ljust(6, "0")) if fraction else 0
    if fraction:
        precision = timedelta(microseconds=10 ** (6 - len(fraction)))
    elif match[3]:
        precision = timedelta(seconds=1)
    elif match[2]:
        precision = timedelta(minutes=1)
    else:
        precision = timedelta(hours=1)
    return _Time(time(hour, minute, second, micro), precision, fraction)


def parse_offset(tz_offset: str | None) -> timezone | None:
    """TimezoneOffsetFromUTC "+HHMM"/"-HHMM" (PS3.3 C.12.1.1.8) as a timezone; None if invalid."""
    if not tz_offset:
        return None
    match = _OFFSET.fullmatch(tz_offset.strip())
    if match is None:
        return None
    hours, minutes = int(match[2]), int(match[3])
    if hours > 14 or minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if match[1] == "-" else delta)


def fhir_date(da: str | None) -> str | None:
    """DICOM DA "YYYYMMDD" -> FHIR date "YYYY-MM-DD"; None when empty or not a calendar date."""
    parsed = _parse_date(da)
    return parsed.isoformat() if parsed else None


def _aware(day: date, clock: time, tz_offset: str | None, default_tz: tzinfo) -> datetime:
    zone: tzinfo = parse_offset(tz_offset) or default_tz
    # zoneinfo resolves the offset (DST included) for this wall-clock time; fold=0 for ambiguity.
    return datetime.combine(day, clock).replace(tzinfo=zone)


def _format_offset(moment: datetime) -> str:
    offset = moment.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def fhir_datetime(da: str | None, tm: str | None, tz_offset: str | None, default_tz: tzinfo) -> str | None:
    """StudyDate + StudyTime + TimezoneOffsetFromUTC -> FHIR dateTime (datatypes.html#dateTime).

    Date only gives "YYYY-MM-DD"; with a time the seconds are always written (FHIR needs them),
    fractional seconds are kept as given, and the offset is the DICOM one or default_tz's for that
    date. A malformed time degrades to the date; a malformed date gives None.
    """
    day = _parse_date(da)
    if day is None:
        return None
    clock = _parse_time(tm)
    if clock is None:
        return day.isoformat()
    moment = _aware(day, clock.value, tz_offset, default_tz)
    text = f"{day.isoformat()}T{clock.value.strftime('%H:%M:%S')}"
    if clock.fraction:
        text += f".{clock.fraction}"
    return text + _format_offset(moment)


def started_range(
    da: str | None, tm: str | None, tz_offset: str | None, default_tz: tzinfo
) -> tuple[datetime, datetime] | None:
    """The instant range [start, end) the DICOM value denotes, for FHIR search on dates
    (search.html#date: a value is an implicit range at its precision). None without a date."""
    day = _parse_date(da)
    if day is None:
        return None
    clock = _parse_time(tm)
    if clock is None:
        start = _aware(day, time(0), tz_offset, default_tz)
        end = _aware(day + timedelta(days=1), time(0), tz_offset, default_tz)
        return start, end
    start = _aware(day, clock.value, tz_offset, default_tz)
    return start, start + clock.precision


def started_instant(
    da: str | None, tm: str | None, tz_offset: str | None, default_tz: tzinfo
) -> datetime | None:
    """The aware start instant (midnight for a date-only value); see started_range for bounds."""
    bounds = started_range(da, tm, tz_offset, default_tz)
    return bounds[0] if bounds else None
