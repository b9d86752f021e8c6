"""Business hours, given / when / then: given a calendar, when a query at an instant, then the
exact instant or number of business seconds. Instants are written with the local UTC offset
they have (e.g. +01:00 for Berlin in winter) so that DST cases read as the wall clock does."""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from inbox.domain.business_hours import DAY_KEYS, BusinessHours, CalendarError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")
HOUR = 3600.0
US = timedelta(microseconds=1)


def at(text: str) -> datetime:
    """An instant from ISO text with its offset, as UTC."""
    return datetime.fromisoformat(text).astimezone(UTC)


def calendar(tz: str = "Europe/Berlin", **days: Any) -> BusinessHours:
    return BusinessHours.from_dict({"timezone": tz, **days})


def nine_to_five(tz: str = "Europe/Berlin", **extra: Any) -> BusinessHours:
    return calendar(tz, **{day: ["09:00-17:00"] for day in WEEKDAYS}, **extra)


# --------------------------------------------------------------------------- add: weekdays


def test_friday_afternoon_plus_two_hours_is_monday_morning() -> None:
    # given Mon-Fri 09:00-17:00 in Berlin
    hours = nine_to_five()
    # when 2h of business time are added to Friday 16:00
    due = hours.add(at("2026-11-27T16:00+01:00"), 2 * HOUR)
    # then one hour is left on Friday and one runs on Monday
    assert due == at("2026-11-30T10:00+01:00")
    assert due.tzinfo is UTC


def test_a_holiday_is_skipped_whole() -> None:
    # given Friday 25 December is a holiday
    hours = nine_to_five(holidays=["2026-12-25"])
    # when 2h are added to Thursday 24 December 16:00
    due = hours.add(at("2026-12-24T16:00+01:00"), 2 * HOUR)
    # then the hour left after Thursday runs on Monday
    assert due == at("2026-12-28T10:00+01:00")


def test_the_year_end_and_a_new_year_holiday() -> None:
    hours = nine_to_five(holidays=["2027-01-01"])
    due = hours.add(at("2026-12-31T16:30+01:00"), 1 * HOUR)
    assert due == at("2027-01-04T09:30+01:00")
    assert hours.seconds_between(at("2026-12-31T00:00+01:00"), due) == 8.5 * HOUR


def test_two_periods_a_day_skip_the_lunch_break() -> None:
    hours = calendar(mon=["09:00-12:00", "13:00-17:30"])
    monday = "2026-11-30T{}+01:00"
    assert hours.add(at(monday.format("11:00")), 2 * HOUR) == at(monday.format("14:00"))
    assert hours.seconds_between(at(monday.format("08:00")), at(monday.format("18:00"))) == (
        7.5 * HOUR
    )


def test_starting_outside_hours_counts_from_the_next_opening() -> None:
    hours = nine_to_five()
    saturday = at("2026-11-28T12:00+01:00")
    assert hours.add(saturday, 30 * 60) == at("2026-11-30T09:30+01:00")
    # zero seconds: the next opening, not the closed start
    assert hours.add(saturday, 0) == at("2026-11-30T09:00+01:00")


def test_time_running_out_at_a_period_end_gives_that_end() -> None:
    hours = nine_to_five()
    assert hours.add(at("2026-11-27T09:00+01:00"), 8 * HOUR) == at("2026-11-27T17:00+01:00")


def test_a_long_span_over_a_dst_change_is_exact() -> None:
    # given 200 business days of 8 hours from Monday 5 January (40 whole weeks; the clocks
    # go forward on 29 March in between)
    hours = nine_to_five()
    start = at("2026-01-05T09:00+01:00")
    # when they are added
    due = hours.add(start, 200 * 8 * HOUR)
    # then they end on the 40th Friday at 17:00, summer time
    assert due == at("2026-10-09T17:00+02:00")
    assert hours.seconds_between(start, due) == 200 * 8 * HOUR
    # and the long sum agrees with the sum of its days
    days = [start + timedelta(days=n) for n in range(0, 290)]
    assert sum(hours.seconds_between(a, b) for a, b in pairwise(days)) == (
        hours.seconds_between(days[0], days[-1])
    )


# --------------------------------------------------------------------------- queries


def test_is_open_is_half_open_at_the_period_bounds() -> None:
    hours = nine_to_five()
    assert not hours.is_open(at("2026-11-27T08:59:59.999999+01:00"))
    assert hours.is_open(at("2026-11-27T09:00+01:00"))
    assert hours.is_open(at("2026-11-27T16:59:59.999999+01:00"))
    assert not hours.is_open(at("2026-11-27T17:00+01:00"))
    assert not hours.is_open(at("2026-11-28T12:00+01:00"))


def test_next_open_is_the_instant_itself_when_open_else_the_next_opening() -> None:
    hours = nine_to_five()
    inside = at("2026-11-27T10:15+01:00")
    assert hours.next_open(inside) == inside
    assert hours.next_open(at("2026-11-27T17:00+01:00")) == at("2026-11-30T09:00+01:00")


def test_a_calendar_without_periods_is_never_open() -> None:
    hours = calendar()
    assert hours.next_open(at("2026-11-27T10:00Z")) is None
    assert not hours.is_open(at("2026-11-27T10:00Z"))
    assert hours.seconds_between(at("2026-11-27T10:00Z"), at("2027-11-27T10:00Z")) == 0
    with pytest.raises(CalendarError, match="never open"):
        hours.add(at("2026-11-27T10:00Z"), 60)


def test_seconds_between_is_zero_when_the_end_is_not_after_the_start() -> None:
    hours = BusinessHours.always()
    assert hours.seconds_between(at("2026-11-27T10:00Z"), at("2026-11-27T10:00Z")) == 0
    assert hours.seconds_between(at("2026-11-27T10:00Z"), at("2026-11-27T09:00Z")) == 0


def test_always_is_open_around_the_clock_and_over_the_year_end() -> None:
    hours = BusinessHours.always()
    start = at("2026-12-31T23:00Z")
    assert hours.is_open(start)
    assert hours.add(start, 2 * HOUR) == at("2027-01-01T01:00Z")
    assert hours.seconds_between(start, at("2027-01-08T23:00Z")) == 8 * 24 * HOUR


def test_naive_instants_and_negative_spans_are_refused() -> None:
    hours = nine_to_five()
    with pytest.raises(ValueError, match="naive"):
        hours.is_open(datetime(2026, 11, 27, 10))
    with pytest.raises(ValueError, match="seconds"):
        hours.add(at("2026-11-27T10:00Z"), -1)
    with pytest.raises(ValueError, match="seconds"):
        hours.add(at("2026-11-27T10:00Z"), math.nan)


def test_instants_in_other_offsets_mean_the_same_moment() -> None:
    hours = nine_to_five()
    tokyo = datetime(2026, 11, 28, 0, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # Fri 16:00 Berlin
    assert hours.add(tokyo, 2 * HOUR) == at("2026-11-30T10:00+01:00")


# --------------------------------------------------------------------------- across midnight


def test_a_period_ending_at_24_00_runs_on_into_one_starting_at_00_00() -> None:
    # given Friday 22:00-24:00 and Saturday 00:00-06:00
    hours = calendar("UTC", fri=["22:00-24:00"], sat=["00:00-06:00"])
    # then business time runs straight across midnight
    assert hours.add(at("2026-11-27T23:00Z"), 3 * HOUR) == at("2026-11-28T02:00Z")
    assert hours.is_open(at("2026-11-28T00:00Z"))
    assert hours.seconds_between(at("2026-11-27T21:00Z"), at("2026-11-28T07:00Z")) == 8 * HOUR
    # and exactly at the end of Friday's business the answer is midnight, which is open
    midnight = hours.add(at("2026-11-27T22:00Z"), 2 * HOUR)
    assert midnight == at("2026-11-28T00:00Z")
    assert hours.is_open(midnight)


def test_an_end_of_24_00_is_kept_and_00_00_as_an_end_means_the_same() -> None:
    written = calendar("UTC", fri=["22:00-24:00"])
    assert written == calendar("UTC", fri=["22:00-00:00"])
    assert written.weekly[4] == ((time(22, 0), time(0, 0)),)
    assert written.to_dict()["fri"] == ["22:00-24:00"]
    assert not written.is_open(at("2026-11-28T00:00Z"))


# --------------------------------------------------------------------------- DST, Berlin


def test_berlin_spring_forward_shortens_a_period_over_the_skipped_hour() -> None:
    # given Sundays 01:00-04:00; on 29 March 2026 the clocks jump from 02:00 to 03:00
    hours = calendar(sun=["01:00-04:00"])
    day_start, day_end = at("2026-03-29T00:00+01:00"), at("2026-03-30T00:00+02:00")
    # then that Sunday holds 2 hours of business time
    assert hours.seconds_between(day_start, day_end) == 2 * HOUR
    assert hours.add(at("2026-03-29T01:00+01:00"), 1.5 * HOUR) == at("2026-03-29T03:30+02:00")
    assert hours.add(at("2026-03-29T01:00+01:00"), 2 * HOUR) == at("2026-03-29T04:00+02:00")
    # and the Sundays before and after hold 3
    assert hours.seconds_between(at("2026-03-22T00:00+01:00"), at("2026-03-23T00:00+01:00")) == (
        3 * HOUR
    )
    assert hours.seconds_between(at("2026-04-05T00:00+02:00"), at("2026-04-06T00:00+02:00")) == (
        3 * HOUR
    )


def test_berlin_spring_forward_a_start_in_the_skipped_hour_moves_to_the_jump() -> None:
    hours = calendar(sun=["02:30-04:00"])
    assert hours.next_open(at("2026-03-29T00:00+01:00")) == at("2026-03-29T03:00+02:00")
    assert hours.seconds_between(at("2026-03-29T00:00+01:00"), at("2026-03-30T00:00+02:00")) == (
        1 * HOUR
    )


def test_berlin_spring_forward_a_period_inside_the_skipped_hour_does_not_happen() -> None:
    hours = calendar(sun=["02:00-02:30"])
    assert hours.next_open(at("2026-03-29T00:00+01:00")) == at("2026-04-05T02:00+02:00")


def test_berlin_spring_forward_weekday_hours_keep_their_wall_clock_times() -> None:
    hours = nine_to_five()
    due = hours.add(at("2026-03-27T16:00+01:00"), 2 * HOUR)
    assert due == at("2026-03-30T10:00+02:00")
    assert hours.seconds_between(at("2026-03-27T16:00+01:00"), due) == 2 * HOUR


def test_berlin_fall_back_lengthens_a_period_over_the_repeated_hour() -> None:
    # given Sundays 00:00-06:00; on 25 October 2026 the clocks go back from 03:00 to 02:00
    hours = calendar(sun=["00:00-06:00"])
    # then that Sunday holds 7 hours
    assert hours.seconds_between(at("2026-10-25T00:00+02:00"), at("2026-10-26T00:00+01:00")) == (
        7 * HOUR
    )
    assert hours.add(at("2026-10-25T00:00+02:00"), 6 * HOUR) == at("2026-10-25T05:00+01:00")
    # and both 02:15s are open
    assert hours.is_open(at("2026-10-25T02:15+02:00"))
    assert hours.is_open(at("2026-10-25T02:15+01:00"))


def test_berlin_fall_back_a_period_ending_in_the_repeated_hour_ends_the_first_time() -> None:
    hours = calendar(sun=["00:00-02:30"])
    assert hours.is_open(at("2026-10-25T02:15+02:00"))
    assert not hours.is_open(at("2026-10-25T02:15+01:00"))
    assert hours.seconds_between(at("2026-10-25T00:00+02:00"), at("2026-10-26T00:00+01:00")) == (
        2.5 * HOUR
    )


# --------------------------------------------------------------------------- DST, New York


def test_new_york_spring_forward_day_has_23_hours() -> None:
    hours = calendar("America/New_York", sun=["00:00-24:00"])
    sunday, monday = at("2026-03-08T00:00-05:00"), at("2026-03-09T00:00-04:00")
    assert hours.seconds_between(sunday, monday) == 23 * HOUR
    assert hours.add(sunday, 23 * HOUR) == monday
    assert not hours.is_open(monday)


def test_new_york_fall_back_day_has_25_hours() -> None:
    hours = calendar("America/New_York", sun=["00:00-24:00"])
    sunday, monday = at("2026-11-01T00:00-04:00"), at("2026-11-02T00:00-05:00")
    assert hours.seconds_between(sunday, monday) == 25 * HOUR
    assert hours.add(sunday, 2 * HOUR) == at("2026-11-01T01:00-05:00")


def test_new_york_fall_back_a_period_across_the_repeated_hour() -> None:
    hours = calendar("America/New_York", sun=["01:30-03:00"])
    assert hours.next_open(at("2026-11-01T00:00-04:00")) == at("2026-11-01T01:30-04:00")
    assert hours.add(at("2026-11-01T00:00-04:00"), 2.5 * HOUR) == at("2026-11-01T03:00-05:00")


def test_new_york_weekday_hours_over_the_spring_weekend() -> None:
    hours = nine_to_five("America/New_York")
    assert hours.add(at("2026-03-06T16:00-05:00"), 2 * HOUR) == at("2026-03-09T10:00-04:00")


def test_a_fall_back_across_midnight_keeps_the_next_days_period_whole() -> None:
    # given Goose Bay on 30 October 1988: at Sunday 00:01 (-02:00) the clocks went back two
    # hours to Saturday 22:01 (-04:00); Sundays are open 00:00-06:00
    hours = calendar("America/Goose_Bay", sun=["00:00-06:00"])
    # then Sunday opens at its first midnight and the repeated Saturday evening is inside it
    assert hours.next_open(at("1988-10-29T12:00Z")) == at("1988-10-30T00:00-02:00")
    assert hours.is_open(at("1988-10-30T03:00Z"))  # Saturday 23:00 on the wall, the 2nd time
    assert hours.seconds_between(at("1988-10-29T12:00Z"), at("1988-10-31T12:00Z")) == 8 * HOUR


# --------------------------------------------------------------------------- the dict form


def test_from_dict_reads_every_field_and_to_dict_gives_it_back() -> None:
    data = {
        "timezone": "Europe/Berlin",
        "mon": ["13:00-17:30", "09:00-12:00"],  # sorted on reading
        "sat": ["10:00:30-12:00"],
        "holidays": ["2026-12-26", "2026-12-25"],
    }
    hours = BusinessHours.from_dict(data)
    assert hours.tz == "Europe/Berlin"
    assert hours.weekly == {
        0: ((time(9), time(12)), (time(13), time(17, 30))),
        5: ((time(10, 0, 30), time(12)),),
    }
    assert hours.holidays == {date(2026, 12, 25), date(2026, 12, 26)}
    assert hours.to_dict() == {
        "timezone": "Europe/Berlin",
        "mon": ["09:00-12:00", "13:00-17:30"],
        "sat": ["10:00:30-12:00"],
        "holidays": ["2026-12-25", "2026-12-26"],
    }
    assert BusinessHours.from_dict(hours.to_dict()) == hours
    assert hash(BusinessHours.from_dict(hours.to_dict())) == hash(hours)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mon": ["09:00-17:00"]}, "hours.timezone: missing"),
        ({"timezone": "Europe/Berln"}, "hours.timezone: unknown time zone 'Europe/Berln'"),
        ({"timezone": "../etc/passwd"}, "hours.timezone: unknown time zone"),
        ({"timezone": 1}, "hours.timezone: expected an IANA time zone name"),
        ({"timezone": "UTC", "monday": []}, "hours.monday: unknown key"),
        ({"timezone": "UTC", "mon": "09:00-17:00"}, "hours.mon: expected a list"),
        ({"timezone": "UTC", "tue": ["09:00-12:00", "9-17"]}, "hours.tue[1]: '9-17' is not"),
        ({"timezone": "UTC", "wed": [900]}, "hours.wed[0]: 900 is not"),
        ({"timezone": "UTC", "thu": ["09:00-25:00"]}, "hours.thu[0]: 25:00 is not a time"),
        ({"timezone": "UTC", "fri": ["24:00-24:00"]}, "hours.fri[0]: 24:00 is not a time"),
        ({"timezone": "UTC", "sat": ["09:60-10:00"]}, "hours.sat[0]: 09:60 is not a time"),
        (
            {"timezone": "UTC", "mon": ["09:00-12:00", "17:00-09:00"]},
            "hours.mon[1]: end 09:00 is not after start 17:00",
        ),
        ({"timezone": "UTC", "mon": ["09:00-09:00"]}, "hours.mon[0]: end 09:00 is not after"),
        (
            {"timezone": "UTC", "sun": ["13:00-17:00", "09:00-13:30"]},
            "hours.sun[0]: 13:00-17:00 overlaps 09:00-13:30 (hours.sun[1])",
        ),
        (
            {"timezone": "UTC", "sun": ["20:00-24:00", "21:00-22:00"]},
            "hours.sun[1]: 21:00-22:00 overlaps 20:00-24:00 (hours.sun[0])",
        ),
        ({"timezone": "UTC", "holidays": "2026-12-25"}, "hours.holidays: expected a list"),
        (
            {"timezone": "UTC", "holidays": ["2026-12-25", "2026-13-01"]},
            "hours.holidays[1]: '2026-13-01' is not a date",
        ),
        ({"timezone": "UTC", "holidays": ["20261225"]}, "hours.holidays[0]: '20261225' is not"),
    ],
)
def test_from_dict_refusals_name_the_place(data: dict[str, Any], message: str) -> None:
    with pytest.raises(CalendarError, match=re.escape(message)):
        BusinessHours.from_dict(data)


def test_from_dict_uses_the_place_it_is_given() -> None:
    with pytest.raises(CalendarError, match=r"^queues\.billing\.hours\.mon\[0\]: "):
        BusinessHours.from_dict({"timezone": "UTC", "mon": ["x"]}, "queues.billing.hours")


def test_from_dict_refuses_what_is_not_a_table() -> None:
    with pytest.raises(CalendarError, match="hours: expected a table"):
        BusinessHours.from_dict(["mon"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weekly", "message"),
    [
        ({7: ()}, r"weekly\[7\]: a weekday is 0 \(Monday\) to 6"),
        ({0: ((time(9), time(12)), (time(11), time(13)))}, r"weekly\[0\]\[1\]: 11:00-13:00 over"),
        ({1: ((time(9), time(8)),)}, r"weekly\[1\]\[0\]: end 08:00 is not after start 09:00"),
        ({2: (("09:00", "17:00"),)}, r"weekly\[2\]\[0\]: expected a \(start, end\) pair"),
        ({3: ((time(9, 0, 0, 5), time(10)),)}, r"weekly\[3\]\[0\]: times are whole seconds"),
    ],
)
def test_the_constructor_checks_the_weekly_periods(weekly: Any, message: str) -> None:
    with pytest.raises(CalendarError, match=message):
        BusinessHours("UTC", weekly)


def test_the_constructor_sorts_periods_and_drops_closed_days() -> None:
    hours = BusinessHours("UTC", {0: ((time(13), time(14)), (time(9), time(10))), 1: ()})
    assert hours.weekly == {0: ((time(9), time(10)), (time(13), time(14)))}
    assert hours == BusinessHours("UTC", {0: ((time(9), time(10)), (time(13), time(14)))})


# --------------------------------------------------------------------------- properties

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # 30-minute DST
    "Asia/Kathmandu",  # +05:45
    "America/Santiago",  # DST changes at midnight
    "Pacific/Apia",  # skipped a whole day (30 December 2011)
)
START = datetime(2026, 1, 1, tzinfo=UTC)
YEAR_US = 366 * 86_400 * 1_000_000


def _minute(m: int) -> time:
    return time(0, 0) if m == 24 * 60 else time(m // 60, m % 60)


@st.composite
def calendars(draw: st.DrawFn, zones: tuple[str, ...] = ZONES) -> BusinessHours:
    """Random weekly periods (whole minutes) with a few holidays; at least one period."""
    weekly = {}
    for day in range(7):
        marks = sorted(draw(st.sets(st.integers(0, 24 * 60), max_size=6)))
        periods = tuple(
            (_minute(s), _minute(e)) for s, e in zip(marks[::2], marks[1::2], strict=False)
        )
        if periods:
            weekly[day] = periods
    assume(weekly)
    holidays = draw(st.frozensets(st.dates(date(2025, 12, 1), date(2027, 3, 1)), max_size=6))
    return BusinessHours(draw(st.sampled_from(zones)), weekly, holidays)


def _weekly_seconds(hours: BusinessHours) -> float:
    def seconds(t: time) -> int:
        return t.hour * 3600 + t.minute * 60 + t.second

    return sum((seconds(e) or 86_400) - seconds(s) for day in hours.weekly.values() for s, e in day)


instants = st.integers(0, YEAR_US).map(lambda us: START + timedelta(microseconds=us))


@st.composite
def spans(draw: st.DrawFn, hours: BusinessHours) -> float:
    """Up to ten weeks' worth of the calendar's business time, in microseconds or not."""
    return draw(st.floats(0, 10)) * _weekly_seconds(hours)


@FUZZ
@given(st.data(), calendars(), instants)
def test_seconds_between_a_start_and_add_is_the_span(
    data: st.DataObject, hours: BusinessHours, start: datetime
) -> None:
    seconds = data.draw(spans(hours))
    due = hours.add(start, seconds)
    assert abs(hours.seconds_between(start, due) - seconds) <= 1e-6


@FUZZ
@given(st.data(), calendars(), instants)
def test_add_is_monotonic_in_the_span(
    data: st.DataObject, hours: BusinessHours, start: datetime
) -> None:
    one, two = sorted((data.draw(spans(hours)), data.draw(spans(hours))))
    assert start <= hours.add(start, one) <= hours.add(start, two)


@FUZZ
@given(st.data(), calendars(), instants)
def test_add_lands_inside_hours_or_exactly_at_a_period_end(
    data: st.DataObject, hours: BusinessHours, start: datetime
) -> None:
    due = hours.add(start, data.draw(spans(hours)))
    assert hours.is_open(due) or (hours.is_open(due - US) and due > start)


@FUZZ
@given(calendars(), instants, instants, instants)
def test_seconds_between_adds_up_over_a_split(
    hours: BusinessHours, a: datetime, b: datetime, c: datetime
) -> None:
    a, b, c = sorted((a, b, c))
    whole = hours.seconds_between(a, c)
    assert math.isclose(whole, hours.seconds_between(a, b) + hours.seconds_between(b, c))
    assert 0 <= whole <= (c - a).total_seconds()


@FUZZ
@given(calendars(), instants)
def test_is_open_agrees_with_the_business_time_of_the_next_microsecond(
    hours: BusinessHours, moment: datetime
) -> None:
    assert hours.is_open(moment) == (hours.seconds_between(moment, moment + US) == 1e-6)


@FUZZ
@given(calendars(), instants)
def test_next_open_is_open_and_no_business_time_comes_before_it(
    hours: BusinessHours, moment: datetime
) -> None:
    opening = hours.next_open(moment)
    assert opening is not None
    assert opening >= moment
    assert hours.is_open(opening)
    assert hours.seconds_between(moment, opening) == 0
    assert (opening == moment) == hours.is_open(moment)


def _reference_seconds(hours: BusinessHours, a: datetime, b: datetime) -> float:
    """Business seconds for a zone without DST, the plain way: each local day's periods as
    aware datetimes, intersected with [a, b)."""
    zone = ZoneInfo(hours.tz)
    total = 0.0
    day = a.astimezone(zone).date() - timedelta(days=1)
    while day <= b.astimezone(zone).date():
        for start, end in hours.weekly.get(day.weekday(), ()) if day not in hours.holidays else ():
            lo = datetime.combine(day, start, tzinfo=zone)
            hi = datetime.combine(day + timedelta(days=end == time(0, 0)), end, tzinfo=zone)
            total += max(timedelta(0), min(hi, b) - max(lo, a)).total_seconds()
        day += timedelta(days=1)
    return total


@FUZZ
@given(calendars(("UTC", "Asia/Kathmandu", "America/Phoenix")), instants, instants)
def test_seconds_between_matches_a_plain_reckoning_where_there_is_no_dst(
    hours: BusinessHours, a: datetime, b: datetime
) -> None:
    a, b = sorted((a, b))
    assert math.isclose(hours.seconds_between(a, b), _reference_seconds(hours, a, b), abs_tol=1e-6)


@FUZZ
@given(calendars())
def test_the_dict_form_round_trips(hours: BusinessHours) -> None:
    data = hours.to_dict()
    assert set(data) <= {"timezone", "holidays", *DAY_KEYS}
    assert BusinessHours.from_dict(data) == hours


@FUZZ
@given(st.sampled_from(ZONES), instants, st.integers(0, YEAR_US))
def test_a_calendar_open_around_the_clock_counts_real_time_in_any_zone(
    tz: str, start: datetime, span_us: int
) -> None:
    hours = BusinessHours(tz, {day: ((time(0), time(0)),) for day in range(7)})
    end = start + timedelta(microseconds=span_us)
    assert hours.add(start, span_us / 1e6) == end
    assert hours.seconds_between(start, end) == span_us / 1e6


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calendars(), instants)
def test_a_long_span_is_the_sum_of_its_days(hours: BusinessHours, start: datetime) -> None:
    # Spans of a day never skip whole weeks; a year-long one does, over DST changes too.
    days = [start + timedelta(days=n) for n in range(367)]
    by_day = sum(hours.seconds_between(a, b) for a, b in pairwise(days))
    assert math.isclose(hours.seconds_between(days[0], days[-1]), by_day)
