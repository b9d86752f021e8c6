"""Business hours: a weekly calendar of open periods in one time zone, with holidays, and the
business-time arithmetic that SLA clocks, the IVR's open/closed branch and the callback dialer
share. Pure: every instant is passed in, as a timezone-aware datetime (answers are in UTC).

Rules, chosen so that each answer is exact and the arithmetic stays consistent:

* Periods are local wall-clock times, half-open: open at `start`, closed at `end`. An end of
  `time(0, 0)` (written "24:00", or "00:00", in the dict form) is midnight at the end of that
  day, so a period "22:00-24:00" followed by "00:00-06:00" the next day is one unbroken stretch.
* A holiday closes the whole local day.
* DST, spring forward: a boundary that falls in the skipped hour moves to the moment the clocks
  jump, so a period keeps only the part of it that exists that day (09:00 stays 09:00; on
  Berlin's spring day "01:00-04:00" lasts 2 hours and "02:00-02:30" does not happen).
* DST, fall back: a boundary on a repeated wall time means its first occurrence, so a period
  spanning the repeated hour lasts an hour longer (Berlin's autumn day "00:00-06:00" lasts 7
  hours) and one ending inside it ends the first time the clock shows its end.
* Internally instants are whole microseconds since the epoch (ints), so sums are exact.
* Speed: the day's periods become UTC instants with one offset when a zone's UTC offset is the
  same at both midnights. That relies on no zone changing its offset twice within one day
  (true of all of tzdata); a day with a change converts each boundary on its own.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_KEYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

Period = tuple[time, time]
_Span = tuple[int, int]  # [start, end) in microseconds

_US = 1_000_000
_DAY_US = 86_400 * _US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_ONE_US = timedelta(microseconds=1)
_ONE_DAY = timedelta(days=1)
_WEEK = timedelta(days=7)
_MIDNIGHT = time(0, 0)
# A week may be skipped whole only from the second day after the start: a fall-back across
# midnight (Goose Bay, 1987-93) can put an instant of local day D after day D+1 began.
_SKIP_FROM = timedelta(days=2)

_TIME = r"(\d{2}):(\d{2})(?::(\d{2}))?"
_PERIOD_RE = re.compile(rf"\s*{_TIME}\s*-\s*{_TIME}\s*")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class CalendarError(ValueError):
    """A calendar refused; the message starts with the place of the problem."""


@dataclass(frozen=True)
class BusinessHours:
    """`weekly` maps a weekday (0 = Monday) to its open periods, sorted and non-overlapping;
    a missing weekday is closed. An end of `time(0, 0)` means 24:00. The constructor sorts
    the periods and refuses overlaps, so equal calendars compare equal."""

    tz: str
    weekly: Mapping[int, tuple[Period, ...]]
    holidays: frozenset[date] = frozenset()
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _spans: tuple[tuple[_Span, ...], ...] = field(init=False, repr=False, compare=False)
    _week_us: int = field(init=False, repr=False, compare=False)
    _holiday_list: tuple[date, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        zone = _zone(self.tz, "tz")
        weekly: dict[int, tuple[Period, ...]] = {}
        for day, periods in sorted(self.weekly.items(), key=lambda item: repr(item[0])):
            if not isinstance(day, int) or isinstance(day, bool) or not 0 <= day <= 6:
                raise CalendarError(f"weekly[{day!r}]: a weekday is 0 (Monday) to 6 (Sunday)")
            places = [f"weekly[{day}][{i}]" for i in range(len(periods))]
            checked = _check_periods(list(periods), places)
            if checked:
                weekly[day] = checked
        holidays = frozenset(self.holidays)
        for holiday in holidays:
            if not isinstance(holiday, date) or isinstance(holiday, datetime):
                raise CalendarError(f"holidays: {holiday!r} is not a date")
        spans = tuple(_merged_spans(weekly.get(day, ())) for day in range(7))
        set_ = object.__setattr__  # frozen: fill the derived fields once
        set_(self, "weekly", MappingProxyType(dict(sorted(weekly.items()))))
        set_(self, "holidays", holidays)
        set_(self, "_zone", zone)
        set_(self, "_spans", spans)
        set_(self, "_week_us", sum(e - s for day in spans for s, e in day))
        set_(self, "_holiday_list", tuple(sorted(holidays)))

    def __hash__(self) -> int:
        return hash((self.tz, tuple(self.weekly.items()), self.holidays))

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def always(cls, tz: str = "UTC") -> BusinessHours:
        """Open 24/7, no holidays: the calendar of a policy that names none. (The zone only
        decides which local days `holidays`, here none, would close.)"""
        return cls(tz, {day: ((_MIDNIGHT, _MIDNIGHT),) for day in range(7)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "hours") -> BusinessHours:
        """`{"timezone": "Europe/Berlin", "mon": ["09:00-12:00", "13:00-17:30"], ...,
        "holidays": ["2026-12-25"]}`. Days not given are closed; "24:00" ends a period at
        midnight. Raises CalendarError naming the place, e.g. `hours.mon[1]: ...`."""
        if not isinstance(data, Mapping):
            raise CalendarError(f"{where}: expected a table, got {type(data).__name__}")
        for key in data:
            if key not in (*DAY_KEYS, "timezone", "holidays"):
                raise CalendarError(
                    f"{where}.{key}: unknown key (expected timezone, {', '.join(DAY_KEYS)}, "
                    "holidays)"
                )
        if "timezone" not in data:
            raise CalendarError(f"{where}.timezone: missing (an IANA name, e.g. Europe/Berlin)")
        tz = data["timezone"]
        _zone(tz, f"{where}.timezone")
        weekly = {
            day: _parse_day(data[key], f"{where}.{key}")
            for day, key in enumerate(DAY_KEYS)
            if key in data
        }
        holidays = _parse_holidays(data.get("holidays", []), f"{where}.holidays")
        return cls(tz, weekly, holidays)

    def to_dict(self) -> dict[str, Any]:
        """The dict form `from_dict` reads; closed days and an empty holiday list left out."""
        data: dict[str, Any] = {"timezone": self.tz}
        for day, periods in self.weekly.items():
            data[DAY_KEYS[day]] = [f"{_hhmm(s)}-{_hhmm(e, end=True)}" for s, e in periods]
        if self.holidays:
            data["holidays"] = [h.isoformat() for h in self._holiday_list]
        return data

    # --- queries ------------------------------------------------------------------------------

    def is_open(self, at: datetime) -> bool:
        x = _to_us(at)
        day = self._local_date(at)
        for _ in range(2):  # the day after too: see _SKIP_FROM
            for start, end in self._day(day):
                if start > x:
                    return False
                if x < end:
                    return True
            day += _ONE_DAY
        return False

    def next_open(self, at: datetime) -> datetime | None:
        """`at` itself when open, else the next opening; None when the calendar has no period."""
        if not self._week_us:
            return None
        return self.add(at, 0)

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant at which `seconds` of business time have elapsed after `start`, counted
        from the next opening when `start` is outside hours. It may be the end of a period
        (when the time runs out exactly there). Zero seconds gives the next opening."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        if not self._week_us:
            raise CalendarError(f"{self.tz} calendar: never open, business time never elapses")
        x = _to_us(start)
        left = round(seconds * _US)
        first = day = self._local_date(start)
        while True:
            if left > self._week_us and day - first >= _SKIP_FROM and self._plain_week(day):
                left -= self._week_us
                day += _WEEK
                continue
            for begin, end in self._day(day):
                if end <= x:
                    continue
                begin = max(begin, x)
                if left <= end - begin:
                    return _from_us(begin + left)
                left -= end - begin
            day += _ONE_DAY

    def seconds_between(self, a: datetime, b: datetime) -> float:
        """Business seconds in [a, b); 0 when b <= a."""
        x, y = _to_us(a), _to_us(b)
        if y <= x:
            return 0.0
        first = day = self._local_date(a)
        last = self._local_date(b) + _ONE_DAY  # see _SKIP_FROM
        total = 0
        while day <= last:
            if day - first >= _SKIP_FROM and day + _WEEK < last and self._plain_week(day):
                total += self._week_us
                day += _WEEK
                continue
            for start, end in self._day(day):
                if start >= y:
                    return total / _US
                total += max(0, min(end, y) - max(start, x))
            day += _ONE_DAY
        return total / _US

    # --- days and weeks as UTC microseconds ---------------------------------------------------

    def _local_date(self, at: datetime) -> date:
        return at.astimezone(self._zone).date()

    def _day(self, day: date) -> Sequence[_Span]:
        """The day's open periods as UTC instants, sorted; empty ones dropped."""
        spans = self._spans[day.weekday()]
        if not spans or day in self.holidays:
            return ()
        midnight = datetime(day.year, day.month, day.day)
        offset = self._zone.utcoffset(midnight)  # at the first (or skipped) local midnight
        if offset is not None and offset == self._zone.utcoffset(midnight + _ONE_DAY):
            base = (midnight - _NAIVE_EPOCH - offset) // _ONE_US
            return [(base + s, base + e) for s, e in spans]
        wall_midnight = (midnight - _NAIVE_EPOCH) // _ONE_US
        converted = (
            (self._wall_to_utc(wall_midnight + s), self._wall_to_utc(wall_midnight + e))
            for s, e in spans
        )
        return [(s, e) for s, e in converted if e > s]

    def _wall_to_utc(self, wall_us: int) -> int:
        naive = _NAIVE_EPOCH + timedelta(microseconds=wall_us)
        utc = _to_us(naive.replace(tzinfo=self._zone))  # fold=0: the first occurrence
        if _from_us(utc).astimezone(self._zone).replace(tzinfo=None) == naive:
            return utc
        # A skipped wall time: the moment the clocks jumped. fold=1 reads it with the offset
        # after the jump, which lands before the jump; bisect between the two readings.
        before, after = _to_us(naive.replace(tzinfo=self._zone, fold=1)), utc
        offset_after = self._offset_at(after)
        while after - before > 1:
            middle = (before + after) // 2
            if self._offset_at(middle) == offset_after:
                after = middle
            else:
                before = middle
        return after

    def _offset_at(self, utc_us: int) -> timedelta | None:
        return _from_us(utc_us).astimezone(self._zone).utcoffset()

    def _plain_week(self, first: date) -> bool:
        """No holiday and no offset change in the 7 days from `first`: then they hold exactly
        the nominal weekly business time."""
        i = bisect_left(self._holiday_list, first)
        if i < len(self._holiday_list) and self._holiday_list[i] < first + _WEEK:
            return False
        midnight = datetime(first.year, first.month, first.day)
        utcoffset = self._zone.utcoffset
        offset = utcoffset(midnight)
        for _ in range(7):
            midnight += _ONE_DAY
            if utcoffset(midnight) != offset:
                return False
        return True


# --- parsing and checking ---------------------------------------------------------------------


def _zone(tz: object, where: str) -> ZoneInfo:
    if not isinstance(tz, str) or not tz:
        raise CalendarError(f"{where}: expected an IANA time zone name, got {tz!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise CalendarError(f"{where}: unknown time zone {tz!r}") from None


def _parse_day(value: object, where: str) -> tuple[Period, ...]:
    if not isinstance(value, list | tuple):
        raise CalendarError(
            f'{where}: expected a list of "HH:MM-HH:MM" periods, got {type(value).__name__}'
        )
    places = [f"{where}[{i}]" for i in range(len(value))]
    periods = [_parse_period(v, place) for v, place in zip(value, places, strict=True)]
    return _check_periods(periods, places)


def _parse_period(text: object, where: str) -> Period:
    match = _PERIOD_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise CalendarError(f'{where}: {text!r} is not "HH:MM-HH:MM"')
    groups = match.groups()
    return _clock(groups[:3], where, end=False), _clock(groups[3:], where, end=True)


def _clock(parts: Sequence[str | None], where: str, *, end: bool) -> time:
    hh, mm, ss = (int(p) if p else 0 for p in parts)
    if end and (hh, mm, ss) == (24, 0, 0):
        return _MIDNIGHT
    if hh > 23 or mm > 59 or ss > 59:
        text = ":".join(p for p in parts if p)
        raise CalendarError(f"{where}: {text} is not a time of day")
    return time(hh, mm, ss)


def _check_periods(periods: list[Any], places: Sequence[str]) -> tuple[Period, ...]:
    """Sorted by start; each non-empty, none overlapping; refusals name the period's place."""
    for period, place in zip(periods, places, strict=True):
        if not (
            isinstance(period, tuple)
            and len(period) == 2
            and all(isinstance(t, time) and t.tzinfo is None for t in period)
        ):
            raise CalendarError(f"{place}: expected a (start, end) pair of naive times")
        start, end = period
        if start.microsecond or end.microsecond:
            raise CalendarError(f"{place}: times are whole seconds")
        if end != _MIDNIGHT and end <= start:
            raise CalendarError(f"{place}: end {_hhmm(end)} is not after start {_hhmm(start)}")
    order = sorted(range(len(periods)), key=lambda i: periods[i][0])
    for previous, current in pairwise(order):
        (_, prev_end), (start, _) = periods[previous], periods[current]
        if prev_end == _MIDNIGHT or start < prev_end:
            raise CalendarError(
                f"{places[current]}: {_show(periods[current])} overlaps "
                f"{_show(periods[previous])} ({places[previous]})"
            )
    return tuple(periods[i] for i in order)


def _parse_holidays(value: object, where: str) -> frozenset[date]:
    if not isinstance(value, list | tuple):
        raise CalendarError(
            f'{where}: expected a list of "YYYY-MM-DD" dates, got {type(value).__name__}'
        )
    days: set[date] = set()
    for i, text in enumerate(value):
        try:
            if not (isinstance(text, str) and _DATE_RE.fullmatch(text)):
                raise ValueError
            days.add(date.fromisoformat(text))
        except ValueError:
            raise CalendarError(f"{where}[{i}]: {text!r} is not a date (YYYY-MM-DD)") from None
    return frozenset(days)


def _merged_spans(periods: Iterable[Period]) -> tuple[_Span, ...]:
    """Wall-clock microseconds from midnight; touching periods merged into one."""
    spans: list[_Span] = []
    for start, end in periods:
        s, e = _time_us(start), _time_us(end) or _DAY_US
        if spans and spans[-1][1] == s:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    return tuple(spans)


def _time_us(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * _US


def _hhmm(t: time, *, end: bool = False) -> str:
    if end and t == _MIDNIGHT:
        return "24:00"
    return t.strftime("%H:%M:%S" if t.second else "%H:%M")


def _show(period: Period) -> str:
    return f"{_hhmm(period[0])}-{_hhmm(period[1], end=True)}"


def _to_us(at: datetime) -> int:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{at!r} is naive: pass a timezone-aware (UTC) datetime")
    return (at - _EPOCH) // _ONE_US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)
