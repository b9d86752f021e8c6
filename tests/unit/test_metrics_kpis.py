"""KPIs from the metrics model's sums: the arithmetic, the roll-ups and the bucket boundaries,
with properties that hold for every input (shares stay within 0-1, parts add up to the
whole)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from projections.metrics import ALL, CHANNELS, COLUMNS, IDX, SL_EDGES, US, roll_up, roll_ups
from projections.metrics_query import boundaries, kpis, segments

SHARES = (
    "resolved_within_24h",
    "abandonment_rate",
    "service_level",
    "fcr",
    "csat",
    "escalation_rate",
    "agent_utilization",
)


def row(**values: int) -> list[int]:
    sums = [0] * len(COLUMNS)
    for name, value in values.items():
        sums[IDX[name]] = value
    return sums


def test_nothing_to_measure_is_null_and_volume_zero() -> None:
    # given no counters at all
    result = kpis(row())
    # then every ratio and mean is null, counts are zero
    assert {k: v for k, v in result.items() if k not in ("volume", "callbacks")} == dict.fromkeys(
        (
            "first_response_time",
            "first_response_time_business",
            "resolution_time",
            "resolution_time_business",
            "resolved_within_24h",
            "asa",
            "abandonment_rate",
            "service_level",
            "aht",
            "fcr",
            "csat",
            "escalation_rate",
            "agent_utilization",
        )
    )
    assert result["volume"] == dict.fromkeys(CHANNELS, 0)
    assert result["callbacks"] == {
        "requested": 0,
        "completed": 0,
        "failed": 0,
        "mean_time_to_callback": None,
        "mean_time_to_callback_business": None,
    }


def test_means_are_seconds_from_microsecond_sums() -> None:
    # given 4 first responses totalling 100 s (80 s of business time), 2 handled calls of
    # 300 s and 420 s, 3 answered calls that waited 10 + 20 + 60 s
    sums = row(
        frt_n=4,
        frt_us=100 * US,
        frt_bh_us=80 * US,
        aht_n=2,
        aht_us=720 * US,
        ans=3,
        wait_us=90 * US,
        w20=2,
        w60=3,
        abandoned=1,
        cb_queued=1,
    )
    # when the KPIs are computed with T = 20 s, then with T = 60 s
    at_20, at_60 = kpis(sums, 20), kpis(sums, 60)
    # then
    assert (at_20["first_response_time"], at_20["first_response_time_business"]) == (25.0, 20.0)
    assert (at_20["aht"], at_20["asa"]) == (360.0, 30.0)
    # 5 contacts queued: 3 answered + 1 abandoned + 1 callback
    assert (at_20["service_level"], at_60["service_level"]) == (2 / 5, 3 / 5)
    assert at_20["abandonment_rate"] == 1 / 5


def test_shares_and_callbacks() -> None:
    # given 5 resolutions (4 within a day) of 4 conversations (one resolved again after a
    # reopen), 1 of them first-contact; 10 opened with 2 escalated, 5 survey answers with 4
    # good, 2 callbacks completed after 10 and 30 minutes
    sums = row(
        res_n=5,
        res_24h=4,
        fcr=1,
        fcr_n=4,
        opened=10,
        escalated=2,
        csat_n=5,
        csat_good=4,
        cb_req=3,
        cb_done=2,
        cb_failed=1,
        cb_us=2400 * US,
        cb_bh_us=1200 * US,
        busy_us=30 * US,
        staffed_us=120 * US,
        v_voice=7,
        v_other=1,
    )
    result = kpis(sums)
    # resolutions count each; FCR counts each resolved conversation once
    assert (result["resolved_within_24h"], result["fcr"]) == (4 / 5, 1 / 4)
    assert (result["escalation_rate"], result["csat"]) == (2 / 10, 4 / 5)
    assert result["agent_utilization"] == 1 / 4
    assert result["callbacks"] == {
        "requested": 3,
        "completed": 2,
        "failed": 1,
        "mean_time_to_callback": 1200.0,
        "mean_time_to_callback_business": 600.0,
    }
    assert (result["volume"]["voice"], result["volume"]["other"]) == (7, 1)


# -- properties ---------------------------------------------------------------------------

count = st.integers(min_value=0, max_value=10_000)


@st.composite
def model_rows(draw: st.DrawFn) -> list[int]:
    """A row the projection could have written: every part at most its whole."""
    sums = row()
    for name in (*(f"v_{c}" for c in (*CHANNELS, "other")), "frt_n", "res_n", "opened"):
        sums[IDX[name]] = draw(count)
    sums[IDX["res_24h"]] = draw(st.integers(0, sums[IDX["res_n"]]))
    sums[IDX["fcr"]] = draw(st.integers(0, sums[IDX["res_n"]]))
    sums[IDX["escalated"]] = draw(st.integers(0, sums[IDX["opened"]]))
    answered = sums[IDX["ans"]] = draw(count)
    within = answered
    for t in reversed(SL_EDGES):  # cumulative: fewer calls within a shorter wait
        within = sums[IDX[f"w{t}"]] = draw(st.integers(0, within))
    sums[IDX["abandoned"]], sums[IDX["cb_queued"]] = draw(count), draw(count)
    sums[IDX["aht_n"]] = draw(count)
    sums[IDX["csat_n"]] = draw(count)
    sums[IDX["csat_good"]] = draw(st.integers(0, sums[IDX["csat_n"]]))
    sums[IDX["cb_req"]], sums[IDX["cb_done"]], sums[IDX["cb_failed"]] = (
        draw(count),
        draw(count),
        draw(count),
    )
    # durations only where something was measured
    for total, n in (
        ("frt_us", "frt_n"),
        ("frt_bh_us", "frt_n"),
        ("res_us", "res_n"),
        ("res_bh_us", "res_n"),
        ("wait_us", "ans"),
        ("aht_us", "aht_n"),
        ("cb_us", "cb_done"),
        ("cb_bh_us", "cb_done"),
    ):
        sums[IDX[total]] = draw(st.integers(0, 10**9 * sums[IDX[n]]))
    sums[IDX["staffed_us"]] = draw(st.integers(0, 10**12))
    sums[IDX["busy_us"]] = draw(st.integers(0, sums[IDX["staffed_us"]]))
    return sums


def add(rows: list[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*rows, strict=True)] if rows else row()


@settings(max_examples=200, deadline=None)
@given(st.lists(model_rows(), max_size=6), st.sampled_from(SL_EDGES))
def test_shares_stay_within_0_and_1_for_any_sum_of_rows(rows: list[list[int]], t: int) -> None:
    # given rows of the model (buckets, dimensions) summed, when their KPIs are computed
    result = kpis(add(rows), t)
    # then every share is null or a fraction from 0 to 1, every duration >= 0
    for key in SHARES:
        assert result[key] is None or 0 <= result[key] <= 1, key
    for key in ("first_response_time", "resolution_time", "asa", "aht"):
        assert result[key] is None or result[key] >= 0


@settings(max_examples=200, deadline=None)
@given(st.lists(model_rows(), min_size=1, max_size=6))
def test_volume_and_callback_counts_add_up_across_parts(rows: list[list[int]]) -> None:
    # given parts (channels, queues, agents or buckets) of a whole
    whole = kpis(add(rows))
    parts = [kpis(r) for r in rows]
    # then counts of the whole are the sums of the parts' counts
    for channel in CHANNELS:
        assert whole["volume"][channel] == sum(p["volume"][channel] for p in parts)
    for key in ("requested", "completed", "failed"):
        assert whole["callbacks"][key] == sum(p["callbacks"][key] for p in parts)


@settings(max_examples=200, deadline=None)
@given(st.lists(model_rows(), min_size=1, max_size=6))
def test_a_mean_of_the_whole_lies_between_its_parts_means(rows: list[list[int]]) -> None:
    whole = kpis(add(rows))
    parts = [p for r in rows if (p := kpis(r))["aht"] is not None]
    if parts:
        lows, highs = min(p["aht"] for p in parts), max(p["aht"] for p in parts)
        assert lows * (1 - 1e-9) <= whole["aht"] <= highs * (1 + 1e-9)


keys = st.tuples(
    st.sampled_from(CHANNELS),
    st.sampled_from(("", "support", "billing")),
    st.sampled_from(("", "sue", "tom")),
    st.integers(0, 10**6),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(keys, max_size=20))
def test_roll_ups_count_each_key_once_under_every_filter(events: list[Any]) -> None:
    # given counters at concrete keys, rolled up
    cube: dict[tuple[Any, ...], int] = {}
    for key in events:
        for rolled in roll_ups(key):
            cube[rolled] = cube.get(rolled, 0) + 1
    for channel, queue, agent, slot in cube:
        if agent == ALL:
            # then a filter without an agent (channel, queue each fixed or all) reads one row
            # that counts exactly the keys matching it
            matching = sum(
                1
                for c, q, _, s in events
                if s == slot and channel in (c, ALL) and queue in (q, ALL)
            )
        else:
            # and a row with an agent is the key itself (a query sums them over the others)
            assert ALL not in (channel, queue)
            assert agent
            matching = events.count((channel, queue, agent, slot))
        assert cube[(channel, queue, agent, slot)] == matching


def test_an_agents_time_is_kept_under_all_channels_and_queues_only() -> None:
    assert roll_ups((ALL, ALL, "sue", 5)) == [(ALL, ALL, "sue", 5), (ALL, ALL, ALL, 5)]


deltas = st.dictionaries(
    st.one_of(
        keys,
        st.tuples(st.just(ALL), st.just(ALL), st.sampled_from(("sue", "tom")), st.integers(0, 20)),
    ),
    st.dictionaries(st.integers(0, len(COLUMNS) - 1), st.integers(-3, 10**9), max_size=4),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(deltas)
def test_a_batch_rolled_up_in_stages_equals_every_key_added_to_each_of_its_rows(
    batch: dict[tuple[str, str, str, int], dict[int, int]],
) -> None:
    # given a batch's counter deltas by key
    # when they are rolled up the fast way
    cube, hours = roll_up(batch)
    # then every row holds what the deltas of the keys going to it add up to
    expected: dict[tuple[Any, ...], list[int]] = {}
    for key, delta in batch.items():
        for rolled in roll_ups(key):
            total = expected.setdefault(rolled, [0] * len(COLUMNS))
            for column, value in delta.items():
                total[column] += value
    assert cube == expected
    # and each hour of a row without an agent holds the sum of its four slots, and an
    # agent's hour the sum of all the agent's rows (every channel and queue) in those slots
    by_hour: dict[tuple[Any, ...], list[int]] = {}
    for (channel, queue, agent, slot), total in expected.items():
        key = (channel, queue, ALL, slot // 4) if agent == ALL else (ALL, ALL, agent, slot // 4)
        into = by_hour.setdefault(key, [0] * len(COLUMNS))
        by_hour[key] = [a + b for a, b in zip(into, total, strict=True)]
    assert hours == by_hour


# -- buckets ------------------------------------------------------------------------------

zones = st.sampled_from(
    ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe")
)


@settings(max_examples=200, deadline=None)
@given(zones, st.integers(1_900_000, 2_100_000), st.sampled_from((1, 4, 96)))
def test_buckets_tile_the_time_and_start_on_local_boundaries(zone: str, lo: int, k: int) -> None:
    # given two weeks of slots in a zone
    parts = segments(ZoneInfo(zone), lo, lo + 14 * 96)
    edges = boundaries(parts, k)
    # then the stretches of constant offset tile the range
    assert parts[0].start == lo
    assert parts[-1].end == lo + 14 * 96
    assert all(a.end == b.start for a, b in pairwise(parts))
    # and buckets are increasing and never longer than a bucket plus a clock change (1 h)
    assert edges == sorted(set(edges))
    assert all(b - a <= k + 4 for a, b in pairwise(edges))
    # and each starts at a local multiple of the bucket, unless a clock change skipped it
    for edge in edges:
        seg = next(p for p in parts if p.start <= edge < p.end)
        assert (edge + seg.offset) % k == 0 or edge == seg.start
