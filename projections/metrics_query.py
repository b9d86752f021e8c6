"""The KPIs of CONTRACT.md from the metrics read model, per bucket (15 minutes, hour or day in
a time zone) and in total, for all traffic or one channel, queue and/or agent.

Buckets follow the zone's wall clock: an hour bucket starts at a local full hour, a day bucket
at local midnight, so a day is 23 or 25 hours long on a DST change and the repeated hour of a
fall-back is two hour buckets (their `start` differs in its UTC offset). A bucket is a whole
number of the model's 15-minute UTC slots, which holds for every zone whose offsets are whole
quarter hours (all of them since 1979 or so; others are refused). The range is widened to
whole buckets: the first bucket holds `start`, the last one holds the instant before `end`.

One SQL statement per stretch of constant UTC offset (one or two for 90 days) sums the rows
of each bucket. Hour or day buckets in a zone of whole-hour offsets read the hourly tables:
one row per hour without an agent (the counters are rolled up over agents), or naming an agent
alone (their total); other queries without an agent read one row per slot; a query naming an
agent and a channel or queue sums that agent's rows of the range (see projections/metrics.py).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from projections.base import table
from projections.db import ReadModelDB, Tx
from projections.inbox_view import QueryError
from projections.metrics import (
    AGENT_HOURS,
    AGENTS,
    ALL,
    CHANNELS,
    COLUMNS,
    COUNTS,
    HOURLY,
    IDX,
    NAME,
    SL_EDGES,
    SLOT_SECONDS,
    SLOTS_PER_HOUR,
    US,
)
from projections.runner import gc_paused
from projections.tracking import STATE_TABLE, active_generation

Bucket = Literal["15m", "hour", "day"]
SLOTS_PER_BUCKET: dict[str, int] = {"15m": 1, "hour": 4, "day": 96}
MAX_BUCKETS = 20_000
KPI_KEYS = (
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
    "volume",
    "callbacks",
    "agent_utilization",
)

_EPOCH_NAIVE = datetime(1970, 1, 1)
_DAY_SLOTS = 96


@lru_cache(maxsize=64)
def _columns_sql(service_level_seconds: int, *, summed: bool, postgres: bool) -> str:
    """The select list in the query's layout (`COLUMNS` with only T's "answered within"):
    each column, or its sum (PostgreSQL's SUM of BIGINT is NUMERIC, cast back)."""
    wanted = f"w{service_level_seconds}"
    parts = []
    for c in COLUMNS:
        if c.startswith("w") and c[1:].isdigit() and c != wanted:
            continue
        if not summed:
            parts.append(c)
        else:
            parts.append(f"CAST(SUM({c}) AS BIGINT)" if postgres else f"SUM({c})")
    return ", ".join(parts)


_WITHIN = {t: i for i, t in enumerate(SL_EDGES)}
_W0 = IDX["ans"] + 2  # the first "answered within" column
_W_END = _W0 + len(SL_EDGES)
_ZERO = [0] * (len(COLUMNS) - len(SL_EDGES) + 1)  # nothing, in the query's layout
# _kpis() unpacks a row by position: the layout it was written for
assert COLUMNS[:8] == tuple(f"v_{c}" for c in (*CHANNELS, "other"))
assert COLUMNS[_W0:_W_END] == tuple(f"w{t}" for t in SL_EDGES)
assert COLUMNS[_W_END] == "abandoned"
assert len(COLUMNS) == 34 + len(SL_EDGES)


# -- KPIs from sums ---------------------------------------------------------------------


def kpis(sums: Sequence[int], service_level_seconds: int = 20) -> dict[str, Any]:
    """Every KPI from the counters in `COLUMNS` order (a row of the model, or a sum of rows).
    `None` where there is nothing to measure."""
    return _kpis(_narrow(sums, service_level_seconds))


def _narrow(sums: Sequence[int], service_level_seconds: int) -> list[int]:
    """`COLUMNS` order to the query's layout: of the "answered within" columns only T's."""
    return [*sums[:_W0], sums[_W0 + _WITHIN[service_level_seconds]], *sums[_W_END:]]


def _widen(row: Sequence[int], service_level_seconds: int) -> list[int]:
    """The query's layout to `COLUMNS` order (the other "answered within" columns as 0)."""
    within = [row[_W0] if t == service_level_seconds else 0 for t in SL_EDGES]
    return [*row[:_W0], *within, *row[_W0 + 1 :]]


def _kpis(row: Sequence[int]) -> dict[str, Any]:
    """`kpis` of a row in the query's layout (a 90-day hourly answer computes this 2,160
    times: one unpacking, the arithmetic inline)."""
    (
        v_email, v_voice, v_sms, v_whatsapp, v_messenger, v_instagram, v_chat, v_other,
        frt_n, frt_us, frt_bh_us, res_n, res_us, res_bh_us, res_24h, fcr, fcr_n, opened,
        escalated,
        ans, wait_us, within, abandoned, cb_queued, aht_n, aht_us, csat_n, csat_good,
        cb_req, cb_done, cb_failed, cb_us, cb_bh_us, busy_us, staffed_us,
    ) = row  # fmt: skip
    queued = ans + abandoned + cb_queued
    volume = {
        "email": v_email, "voice": v_voice, "sms": v_sms, "whatsapp": v_whatsapp,
        "messenger": v_messenger, "instagram": v_instagram, "chat": v_chat,
    }  # fmt: skip
    if v_other:
        volume["other"] = v_other
    return {
        "first_response_time": frt_us / frt_n / US if frt_n else None,
        "first_response_time_business": frt_bh_us / frt_n / US if frt_n else None,
        "resolution_time": res_us / res_n / US if res_n else None,
        "resolution_time_business": res_bh_us / res_n / US if res_n else None,
        "resolved_within_24h": res_24h / res_n if res_n else None,
        "asa": wait_us / ans / US if ans else None,
        "abandonment_rate": abandoned / queued if queued else None,
        "service_level": within / queued if queued else None,
        "aht": aht_us / aht_n / US if aht_n else None,
        "fcr": fcr / fcr_n if fcr_n else None,
        "csat": csat_good / csat_n if csat_n else None,
        "escalation_rate": escalated / opened if opened else None,
        "volume": volume,
        "callbacks": {
            "requested": cb_req,
            "completed": cb_done,
            "failed": cb_failed,
            "mean_time_to_callback": cb_us / cb_done / US if cb_done else None,
            "mean_time_to_callback_business": cb_bh_us / cb_done / US if cb_done else None,
        },
        "agent_utilization": busy_us / staffed_us if staffed_us else None,
    }


# -- buckets in a time zone -------------------------------------------------------------


class _Segment:
    """A stretch of slots [start, end) with one UTC offset (in slots) and its text."""

    __slots__ = ("end", "offset", "start", "suffix")

    def __init__(self, start: int, end: int, offset: int) -> None:
        self.start, self.end, self.offset = start, end, offset
        minutes = offset * 15
        sign = "+" if minutes >= 0 else "-"
        self.suffix = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _offset(zone: ZoneInfo, slot: int) -> int:
    """The zone's UTC offset at the slot's start, in slots; refused when not a quarter hour."""
    delta = datetime.fromtimestamp(slot * SLOT_SECONDS, zone).utcoffset()
    seconds = 0 if delta is None else int(delta.total_seconds())
    if seconds % SLOT_SECONDS:
        raise QueryError(f"time zone {zone.key}: a UTC offset that is not whole quarter hours")
    return seconds // SLOT_SECONDS


def segments(zone: ZoneInfo, lo: int, hi: int) -> list[_Segment]:
    """The stretches of constant offset covering slots [lo, hi). Offsets are sampled once a
    day and changes bisected to their slot (no zone changes its offset twice in a day)."""
    result: list[_Segment] = []
    start, offset = lo, _offset(zone, lo)
    probe = lo
    while probe < hi:
        nxt = min(probe + _DAY_SLOTS, hi)
        later = _offset(zone, nxt) if nxt < hi else offset
        if later != offset:
            a, b = probe, nxt  # offset(a) == offset, offset(b) != offset
            while b - a > 1:
                mid = (a + b) // 2
                if _offset(zone, mid) == offset:
                    a = mid
                else:
                    b = mid
            result.append(_Segment(start, b, offset))
            start, offset = b, _offset(zone, b)
        probe = nxt
    result.append(_Segment(start, hi, offset))
    return result


def boundaries(parts: Sequence[_Segment], k: int) -> list[int]:
    """The slots where a bucket of `k` slots starts: where the local time is a multiple of
    the bucket, or where a forward clock change skips over such a time."""
    result: list[int] = []
    previous: int | None = None
    for seg in parts:
        if previous is not None and seg.offset > previous:
            local_before = seg.start + previous
            first_aligned = -(-local_before // k) * k
            if first_aligned < seg.start + seg.offset and first_aligned % k == 0:
                result.append(seg.start)
        first = seg.start + (-(seg.start + seg.offset)) % k
        if result and result[-1] == first:
            first += k
        result.extend(range(first, seg.end, k))
        previous = seg.offset
    return result


# -- the query --------------------------------------------------------------------------


def _slot(at: datetime, *, up: bool) -> int:
    seconds = (at - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
    slot = seconds / SLOT_SECONDS
    whole = int(slot // 1)
    return whole + 1 if up and whole != slot else whole


def _check(
    start: datetime, end: datetime, bucket: str, tz: str, service_level_seconds: float
) -> tuple[ZoneInfo, int, int]:
    if bucket not in SLOTS_PER_BUCKET:
        raise QueryError("bucket must be one of 15m, hour, day")
    if start.tzinfo is None or end.tzinfo is None:
        raise QueryError("from and to need a UTC offset (e.g. 2026-03-02T00:00:00Z)")
    if end <= start:
        raise QueryError("to must be after from")
    seconds = float(service_level_seconds)
    if not seconds.is_integer() or int(seconds) not in SL_EDGES:
        edges = ", ".join(str(t) for t in SL_EDGES)
        raise QueryError(f"service level seconds must be one of {edges}")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise QueryError(f"unknown time zone {tz!r}") from None
    k = SLOTS_PER_BUCKET[bucket]
    if (end - start).total_seconds() > MAX_BUCKETS * k * SLOT_SECONDS:
        raise QueryError(f"too many buckets (at most {MAX_BUCKETS:,}): use a longer bucket")
    return zone, int(seconds), k


def metrics(
    db: ReadModelDB,
    *,
    start: datetime,
    end: datetime,
    bucket: Bucket | str,
    tz: str = "UTC",
    channel: str | None = None,
    queue: str | None = None,
    agent: str | None = None,
    service_level_seconds: float = 20.0,
) -> dict[str, Any]:
    """`{"buckets": [{"start", "end", "kpis"}, ...], "total": kpis}` for [start, end) widened
    to whole buckets; `start`/`end` of a bucket are ISO 8601 with the zone's offset. Raises
    QueryError (an HTTP 400) for a bad bucket, zone, range or service-level T."""
    # A long answer is ~100,000 acyclic rows and dicts: with the cycle collector on, they are
    # walked again and again as they age (90 days by hour: p99 58-60 -> 34-39 ms).
    with gc_paused():
        texts, sums, _ = _counters(
            db, start, end, bucket, tz, (channel, queue, agent), service_level_seconds
        )
        buckets = [
            {"start": texts[i], "end": texts[i + 1], "kpis": _kpis(_ZERO if row is None else row)}
            for i, row in enumerate(sums)
        ]
        filled = [row for row in sums if row is not None]
        total = [sum(column) for column in zip(*filled, strict=True)] if filled else _ZERO
        return {"buckets": buckets, "total": _kpis(total)}


def counters(
    db: ReadModelDB,
    *,
    start: datetime,
    end: datetime,
    bucket: Bucket | str,
    tz: str = "UTC",
    channel: str | None = None,
    queue: str | None = None,
    agent: str | None = None,
    service_level_seconds: float = 20.0,
) -> tuple[list[str], list[list[int] | None]]:
    """The buckets' edges (local ISO 8601, one more than there are buckets) and each bucket's
    counters in `COLUMNS` order, None where nothing was counted; of the "answered within"
    columns only T's is read (the others are 0). Raises QueryError as `metrics` does."""
    texts, sums, t = _counters(
        db, start, end, bucket, tz, (channel, queue, agent), service_level_seconds
    )
    return texts, [None if row is None else _widen(row, t) for row in sums]


def _counters(
    db: ReadModelDB,
    start: datetime,
    end: datetime,
    bucket: str,
    tz: str,
    filters: tuple[str | None, str | None, str | None],
    service_level_seconds: float,
) -> tuple[list[str], list[Sequence[int] | None], int]:
    """`counters` in the query's layout, and T."""
    zone, t, k = _check(start, end, bucket, tz, service_level_seconds)
    lo, hi = _slot(start, up=False), _slot(end, up=True)
    margin = 2 * _DAY_SLOTS  # room to find the bucket boundaries around the range
    parts = segments(zone, lo - margin, hi + margin)
    edges = boundaries(parts, k)
    first = bisect_right(edges, lo) - 1
    last = bisect_right(edges, hi - 1)
    bounds = edges[first : last + 1]
    sums: list[Sequence[int] | None] = [None] * (len(bounds) - 1)
    _read(db, parts, bounds, k, sums, filters, t)
    return _texts(bounds, parts), sums, t


def _read(
    db: ReadModelDB,
    parts: Sequence[_Segment],
    bounds: Sequence[int],
    k: int,
    sums: list[Sequence[int] | None],
    filters: tuple[str | None, str | None, str | None],
    service_level_seconds: int,
) -> None:
    """Adds the counters of each bucket into `sums` (one statement per constant offset)."""
    if not db.table_exists(STATE_TABLE):
        return
    with db.read() as tx:
        state = active_generation(tx, NAME)
        if state is None:
            return
        source = _source(state.generation, parts, bounds, k, filters)
        for seg in parts:
            lo, hi = max(seg.start, bounds[0]), min(seg.end, bounds[-1])
            if lo < hi:
                _read_segment(tx, source, seg, lo, hi, k, bounds, sums, service_level_seconds)


class _Source:
    """Where a query's rows come from: `FROM`/`WHERE` text with its parameters, the time
    column and its unit in slots, and whether rows of one unit must be summed (GROUP BY)."""

    __slots__ = ("grouped", "params", "sql", "time", "unit")

    def __init__(
        self, sql: str, params: tuple[str, ...], time: str, unit: int, *, grouped: bool
    ) -> None:
        self.sql, self.params, self.time, self.unit, self.grouped = sql, params, time, unit, grouped


def _source(
    generation: int,
    parts: Sequence[_Segment],
    bounds: Sequence[int],
    k: int,
    filters: tuple[str | None, str | None, str | None],
) -> _Source:
    channel, queue, agent = filters
    # Hour and day buckets whose edges fall on UTC hours read the hourly tables: a quarter of
    # the rows (90 days by hour, one channel: p99 58-61 ms from the slots).
    hourly = k % SLOTS_PER_HOUR == 0 and _whole_hours(parts, bounds)
    if agent and not channel and not queue and hourly:
        return _Source(
            f"FROM {table(AGENT_HOURS, generation)} WHERE agent=? AND ",
            (agent,),
            "hour",
            SLOTS_PER_HOUR,
            grouped=k != SLOTS_PER_HOUR,
        )
    if agent:
        # The agent's rows of the range: at most one per channel and queue per slot (and the
        # agent's time under channel and queue `*`, which a channel or queue leaves out).
        where = ["agent=?"]
        params = [agent]
        for column, value in (("channel", channel), ("queue", queue)):
            if value:
                where.append(f"{column}=?")
                params.append(value)
        sql = f"FROM {table(AGENTS, generation)} WHERE {' AND '.join(where)} AND "
        return _Source(sql, tuple(params), "slot", 1, grouped=True)
    if hourly:
        return _Source(
            f"FROM {table(HOURLY, generation)} WHERE channel=? AND queue=? AND ",
            (channel or ALL, queue or ALL),
            "hour",
            SLOTS_PER_HOUR,
            grouped=k != SLOTS_PER_HOUR,
        )
    return _Source(
        f"FROM {table(COUNTS, generation)} WHERE channel=? AND queue=? AND ",
        (channel or ALL, queue or ALL),
        "slot",
        1,
        grouped=k != 1,
    )


def _whole_hours(parts: Sequence[_Segment], bounds: Sequence[int]) -> bool:
    """Every bucket edge and change of offset in the range falls on a UTC hour."""
    lo, hi = bounds[0], bounds[-1]
    edges = [*bounds]
    for seg in parts:
        if seg.end > lo and seg.start < hi:
            edges += (seg.start, seg.offset)
    return all(edge % SLOTS_PER_HOUR == 0 for edge in edges)


def _read_segment(
    tx: Tx,
    source: _Source,
    seg: _Segment,
    lo: int,
    hi: int,
    k: int,
    bounds: Sequence[int],
    sums: list[Sequence[int] | None],
    service_level_seconds: int,
) -> None:
    unit = source.unit
    per, offset = k // unit, seg.offset // unit
    columns = _columns_sql(service_level_seconds, summed=source.grouped, postgres=tx.is_postgres)
    # Within one offset, (time + offset) // per numbers the local buckets; GROUP BY 1 because
    # PostgreSQL cannot match a parameterised expression in GROUP BY to the select list.
    group = f"({source.time} + CAST(? AS BIGINT)) / CAST(? AS BIGINT)"
    tail = " GROUP BY 1" if source.grouped else ""
    rows = tx.execute(
        f"SELECT {group}, {columns} {source.sql}{source.time}>=? AND {source.time}<?{tail}",
        (offset, per, *source.params, lo // unit, hi // unit),
    ).fetchall()
    if not rows:
        return
    # The first row's bucket is found by bisecting; within one offset later buckets follow
    # it in order, k slots apart, so the rest are found by walking forward.
    first = int(rows[0][0])
    shift = bisect_right(bounds, max((first * per - offset) * unit, lo)) - 1 - first
    for row in rows:
        at = int(row[0]) + shift
        values = row[1:]
        target = sums[at]
        if target is None:
            sums[at] = values
        else:  # a day bucket across a change of offset: its two parts add up
            sums[at] = [a + b for a, b in zip(target, values, strict=True)]


def _texts(bounds: Sequence[int], parts: Sequence[_Segment]) -> list[str]:
    """Each boundary as local ISO 8601 with the offset in force at that instant (a 90-day
    hourly answer has 2,161 of them: the date formatted once per local day, the time of day
    and the offset taken from tables)."""
    texts: list[str] = []
    append = texts.append
    days: dict[int, str] = {}
    i = 0
    seg = parts[0]
    for slot in bounds:
        while not seg.start <= slot < seg.end:
            i += 1
            seg = parts[i]
        day, quarter = divmod(slot + seg.offset, _DAY_SLOTS)
        date = days.get(day)
        if date is None:
            date = days[day] = (_EPOCH_NAIVE + timedelta(days=day)).date().isoformat()
        append(date + _TIMES_OF_DAY[quarter] + seg.suffix)
    return texts


# "T13:45:00" for each quarter hour of a day
_TIMES_OF_DAY = tuple(f"T{q // 4:02d}:{q % 4 * 15:02d}:00" for q in range(_DAY_SLOTS))
