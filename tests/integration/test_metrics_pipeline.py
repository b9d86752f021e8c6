"""A long rebuild of the metrics writes in a second process (projections/pipeline.py), on real
SQLite and PostgreSQL: it equals the live model row for row; a writer process that is killed or
fails stops the rebuild with the reason, at a committed batch, and a resume finishes it; a
rebuild that finds its generation moved by another writer goes on from there."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal

import pytest

from projections.base import table
from projections.metrics import AGENTS, NAME, Metrics
from projections.replay import PROJECTIONS, rebuild
from projections.runner import ProjectionRunner, apply_batch, read_log
from projections.tracking import PositionConflict, generations
from tests.integration.test_metrics import rows, traffic
from tests.integration.test_metrics_day import Day

BATCH = 20  # the traffic is some 300 events: many batches, so the writer process is used


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROJECTIONS, NAME, Metrics)


def live(day: Day, seed: int) -> tuple[int, object, object]:
    traffic(day, seed)
    ProjectionRunner(day.store, day.db, [Metrics()]).run_until_caught_up()
    assert day.store.max_notification_id() > 10 * BATCH
    return rows(day.db)


def writer_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name == f"rebuild-writer-{NAME}"]


def positions(day: Day) -> list[tuple[int, bool, int]]:
    with day.db.read() as tx:
        return [(s.generation, s.active, s.position) for s in generations(tx, NAME)]


@pytest.mark.parametrize("seed", [4, 5])
def test_a_long_rebuild_written_by_a_second_process_equals_the_live_model(
    day: Day, seed: int
) -> None:
    _, live_counts, live_tables = live(day, seed)
    result = rebuild(day.store, day.db, NAME, from_start=True, batch_size=BATCH)
    assert result.pipelined
    assert result.position == day.store.max_notification_id()
    assert result.events == len(day.store.notifications(0, 100_000))
    _, counts, tables = rows(day.db)
    assert counts == live_counts
    assert tables == live_tables
    assert writer_processes() == []  # stopped with the rebuild


def test_a_rebuild_whose_state_outgrows_memory_reads_it_back_once_it_is_written(
    day: Day, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the state rows dropped after every batch, each batch reads them from the tables:
    only right once the writer has committed every batch sent before."""
    _, live_counts, live_tables = live(day, 10)
    monkeypatch.setitem(PROJECTIONS, NAME, lambda: Metrics(cache_limit=10))
    result = rebuild(day.store, day.db, NAME, from_start=True, batch_size=BATCH)
    assert result.pipelined
    _, counts, tables = rows(day.db)
    assert counts == live_counts
    assert tables == live_tables


def test_a_short_rebuild_is_written_in_process(day: Day) -> None:
    _, live_counts, _ = live(day, 6)
    result = rebuild(day.store, day.db, NAME, from_start=True, batch_size=100_000)
    assert not result.pipelined
    assert rows(day.db)[1] == live_counts


def test_a_killed_writer_stops_the_rebuild_at_a_committed_batch_and_a_resume_finishes_it(
    day: Day,
) -> None:
    _, live_counts, live_tables = live(day, 7)
    log = [n.id for n in day.store.notifications(0, 100_000)]
    boundaries = {0, *log[BATCH - 1 :: BATCH]}

    def kill_the_writer(position: int, head: int) -> None:
        if position >= log[4 * BATCH - 1]:
            for process in writer_processes():
                assert process.pid is not None
                os.kill(process.pid, signal.SIGKILL)
                process.join()

    with pytest.raises(RuntimeError, match="writer process of the metrics rebuild ended"):
        rebuild(
            day.store, day.db, NAME, from_start=True, batch_size=BATCH, progress=kill_the_writer
        )
    [(_, live_active, _), (_, active, stopped_at)] = positions(day)
    assert (live_active, active) == (True, False)
    assert stopped_at in boundaries  # a whole batch with its position, or none of it
    assert stopped_at < log[-1]

    resumed: list[int] = []
    result = rebuild(
        day.store,
        day.db,
        NAME,
        from_start=False,
        batch_size=BATCH,
        progress=lambda position, head: resumed.append(position),
    )
    assert (result.generation, result.pipelined) == (2, True)
    assert resumed[0] > stopped_at
    assert result.events == len([n for n in log if n > stopped_at])
    _, counts, tables = rows(day.db)
    assert counts == live_counts
    assert tables == live_tables


def test_a_write_failing_in_the_writer_stops_the_rebuild_with_the_reason(day: Day) -> None:
    live(day, 8)
    log = [n.id for n in day.store.notifications(0, 100_000)]
    dropped: list[int] = []

    def drop_a_table(position: int, head: int) -> None:
        if not dropped:
            [*_, (generation, _, _)] = positions(day)
            with day.db.transaction() as tx:
                tx.execute(f"DROP TABLE {table(AGENTS, generation)}")
            dropped.append(position)

    with pytest.raises(RuntimeError, match=f"(?s)writer process.*{table(AGENTS, 2)}"):
        rebuild(day.store, day.db, NAME, from_start=True, batch_size=BATCH, progress=drop_a_table)
    [(_, live_active, live_position), (_, active, stopped_at)] = positions(day)
    assert (live_active, active, live_position) == (True, False, log[-1])
    assert stopped_at < log[-1]


def test_a_generation_moved_by_another_writer_is_followed_from_where_it_is(
    day: Day, caplog: pytest.LogCaptureFixture
) -> None:
    _, live_counts, live_tables = live(day, 9)
    moved: list[int] = []

    def another_rebuild_writes_a_batch(position: int, head: int) -> None:
        """Another process resuming the same generation writes the next batch."""
        if moved:
            return
        other = Metrics()
        while True:
            [*_, (generation, _, at)] = positions(day)
            try:
                new = apply_batch(
                    day.db,
                    other,
                    generation,
                    at,
                    read_log(day.store, at, BATCH),
                    require_active=False,
                )
            except PositionConflict:
                continue  # the writer process committed meanwhile
            moved.append(new)
            return

    with caplog.at_level(logging.INFO, logger="projections.replay"):
        result = rebuild(
            day.store,
            day.db,
            NAME,
            from_start=True,
            batch_size=BATCH,
            progress=another_rebuild_writes_a_batch,
        )
    assert moved
    assert "moved by another writer" in caplog.text
    assert result.position == day.store.max_notification_id()
    # what the other writer committed is not counted as this rebuild's
    assert result.events == len(day.store.notifications(0, 100_000)) - BATCH
    _, counts, tables = rows(day.db)
    assert counts == live_counts
    assert tables == live_tables
