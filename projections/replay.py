"""Rebuilding a projection from the first event, while the current generation keeps serving.

`rebuild` creates generation N+1 beside the active generation N, replays the notification
log into it (with its own tracking position, so a rebuild that stops can resume), creates its
secondary indexes once it has caught up with the head of the log, then swaps it in (one
transaction: N inactive, N+1 active, conditional on N+1's position) and drops N's tables.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from inbox.domain.sla import SlaPolicy
from infra.settings import Settings
from infra.store import EventStore, open_event_store
from projections.base import Pipelined, Projection
from projections.contacts_weekly import ContactsWeekly
from projections.db import ReadModelDB, open_read_models
from projections.directory import DirectoryView, list_queues
from projections.escalations import Escalations
from projections.inbox_view import InboxView
from projections.metrics import Metrics
from projections.pipeline import Writer
from projections.runner import (
    LogSource,
    ProjectionRunner,
    apply_batch,
    diverged,
    gc_paused,
    read_log,
)
from projections.timeline import Timeline
from projections.tracking import (
    STATE_TABLE,
    GenerationState,
    PositionConflict,
    active_generation,
    drop_generation,
    ensure_state_table,
    generation_state,
    generations,
    layout,
    new_generation,
    now,
)

log = logging.getLogger(__name__)

COLLECT_EVERY = 200_000  # events between full collections in a rebuild
# A rebuild more than this many batches behind the log writes in a second process (when its
# projection can: `Pipelined`); starting that process costs about half a second.
PIPELINE_AFTER = 2

PROJECTIONS: dict[str, Callable[[], Projection]] = {
    "inbox": InboxView,
    "timeline": Timeline,
    "directory": DirectoryView,
    "escalations": Escalations,
    "contacts_weekly": ContactsWeekly,
    "metrics": Metrics,
}

# progress(position, head): called after every batch.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReplayResult:
    name: str
    generation: int
    previous_generation: int | None
    events: int  # notifications this call committed (not those another writer did)
    position: int
    seconds: float
    pipelined: bool = False  # written by a second process (`projections.pipeline`)


def projection(name: str) -> Projection:
    try:
        return PROJECTIONS[name]()
    except KeyError:
        known = ", ".join(sorted(PROJECTIONS))
        raise ValueError(f"unknown projection {name!r} (known: {known})") from None


def _unfinished(db: ReadModelDB, name: str) -> list[GenerationState]:
    with db.read() as tx:
        states = generations(tx, name)
        active = active_generation(tx, name)
    floor = active.generation if active else 0
    return [
        s
        for s in states
        if not s.active and s.finished_at is None and s.retired_at is None and s.generation > floor
    ]


def rebuild(
    store: EventStore | LogSource,
    db: ReadModelDB,
    name: str,
    *,
    from_start: bool,
    progress: Progress | None = None,
    batch_size: int = 50_000,
    build: Callable[[], Projection] | None = None,
) -> ReplayResult:
    """Rebuilds projection `name` into a new generation and swaps it in.

    With `from_start` False an unfinished rebuild (one stopped before its swap) is resumed
    from its position; otherwise (or when there is none) a new generation starts from
    notification 1. Unfinished generations that are not resumed are dropped. `build`: how
    to make the projection, when not the registry's way (e.g. with today's SLA policies)."""
    proj = build() if build is not None else projection(name)
    ensure_state_table(db)
    started = time.monotonic()
    unfinished = _unfinished(db, name)
    target: GenerationState | None = None
    if (
        not from_start
        and unfinished
        and unfinished[-1].layout == layout(proj, postgres=db.is_postgres)
        and diverged(store, unfinished[-1].position, unfinished[-1].last_record) is None
    ):
        target = unfinished[-1]
    for stale in unfinished:
        if target is None or stale.generation != target.generation:
            drop_generation(db, proj, stale.generation)
    if target is None:
        target = new_generation(db, proj, active=False)
    generation, position = target.generation, target.position
    replayed = 0  # notifications handled, committed or not
    committed = 0  # of them, committed by this call (the writer's count once it is closed)
    collected = 0
    writer: Writer | None = None
    pipelined = False
    # The cycle collector stays off for the whole rebuild but for a full collection every
    # COLLECT_EVERY events, after which the survivors are frozen out of its sight: turned on
    # between batches it walked all a batch left behind, again and again as it aged; fully
    # off, the cyclic garbage of 1 M events held ~260 MB until the end.
    try:
        with gc_paused(), _unfrozen_after():
            while True:
                notifications = read_log(store, position, batch_size)
                try:
                    if (
                        writer is None
                        and isinstance(proj, Pipelined)
                        and store.max_notification_id() - position > PIPELINE_AFTER * batch_size
                    ):
                        writer = Writer(db, proj, name, generation)
                        pipelined = True
                    if writer is not None:
                        position = writer.apply(position, notifications)
                    elif notifications:
                        position = apply_batch(
                            db, proj, generation, position, notifications, require_active=False
                        )
                        committed += len(notifications)
                    if len(notifications) < batch_size and writer is not None:
                        writer.drain()
                except PositionConflict:
                    # Another rebuild of this generation moved it: go on from where it is.
                    if writer is not None:
                        writer.close()
                        committed += writer.committed
                        writer = None
                    proj.forget()
                    position = _position(db, name, generation)
                    log.info(
                        "%s generation %d moved by another writer to %d: going on",
                        name,
                        generation,
                        position,
                    )
                    continue
                replayed += len(notifications)
                if replayed - collected >= COLLECT_EVERY:
                    gc.collect()
                    gc.freeze()  # the next collection walks only what came after
                    collected = replayed
                if progress is not None:
                    progress(position, max(position, store.max_notification_id()))
                if len(notifications) < batch_size:
                    swapped, previous = _swap(db, proj, generation, position)
                    if swapped:
                        break
                    position = _position(db, name, generation)  # moved by another writer
    except BaseException:
        proj.forget()
        raise
    finally:
        if writer is not None:
            writer.close()
            committed += writer.committed
    if previous is not None:
        drop_generation(db, proj, previous)
    return ReplayResult(
        name=name,
        generation=generation,
        previous_generation=previous,
        events=committed,
        position=position,
        seconds=time.monotonic() - started,
        pipelined=pipelined,
    )


@contextmanager
def _unfrozen_after() -> Iterator[None]:
    try:
        yield
    finally:
        gc.unfreeze()


def _position(db: ReadModelDB, name: str, generation: int) -> int:
    with db.read() as tx:
        state = generation_state(tx, name, generation)
    if state is None:
        raise RuntimeError(f"generation {generation} of {name} has gone")
    return state.position


def _swap(
    db: ReadModelDB, proj: Projection, generation: int, position: int
) -> tuple[bool, int | None]:
    """Makes `generation` the active one, in one transaction: (True, the generation it
    replaced or None), or (False, None) when its position moved meanwhile."""
    with db.transaction() as tx:
        proj.create_indexes(tx, generation)
    with db.transaction() as tx:
        old = active_generation(tx, proj.name)
        tx.execute(
            f"UPDATE {STATE_TABLE} SET active=1, finished_at=?, updated_at=? "
            "WHERE name=? AND generation=? AND position=? AND active=0",
            (now(), now(), proj.name, generation, position),
        )
        if tx.rowcount != 1:
            # Nothing else was changed in this transaction: letting it commit is harmless.
            return False, None
        if old is not None:
            tx.execute(
                f"UPDATE {STATE_TABLE} SET active=0, retired_at=? WHERE name=? AND generation=?",
                (now(), proj.name, old.generation),
            )
    return True, None if old is None else old.generation


def current_sla_policies(db: ReadModelDB) -> dict[str, SlaPolicy]:
    """Every queue's SLA policy as it stands now (the directory view)."""
    return {
        q["name"]: SlaPolicy.from_dict({**q["sla"], "queue": q["name"]})
        for q in list_queues(db)
        if q.get("sla")
    }


def run_replay(
    settings: Settings,
    name: str,
    *,
    from_start: bool,
    follow: bool = False,
    current_sla: bool = False,
) -> ReplayResult:
    """`inbox replay NAME [--from-start] [--follow]`: rebuild with a progress bar (rate and
    ETA), then, with `follow`, keep the new generation up to date until Ctrl-C."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    store = open_event_store(settings)
    db = open_read_models(settings)
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10} events/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"replay {name}", total=None, rate="-")
            started = time.monotonic()
            first: list[int] = []

            def show(position: int, head: int) -> None:
                if not first:
                    first.append(position)
                elapsed = max(time.monotonic() - started, 1e-6)
                rate = (position - first[0]) / elapsed
                bar.update(task, completed=position, total=head, rate=f"{rate:,.0f}")

            build = None
            if current_sla:
                if name != "inbox":
                    raise ValueError("--current-sla applies to the inbox projection only")
                policies = current_sla_policies(db)
                build = lambda: InboxView(current_policies=policies)  # noqa: E731
            result = rebuild(store, db, name, from_start=from_start, progress=show, build=build)
        console.print(
            f"{name}: generation {result.generation} active at position {result.position} "
            f"({result.events:,} events in {result.seconds:.1f}s, "
            f"{result.events / max(result.seconds, 1e-6):,.0f}/s)"
            + (
                f"; generation {result.previous_generation} dropped"
                if result.previous_generation is not None
                else ""
            )
        )
        if follow:
            console.print(f"following {name}; Ctrl-C to stop")
            stop = threading.Event()
            runner = ProjectionRunner(store, db, [projection(name)])
            try:
                runner.run_forever(stop)
            except KeyboardInterrupt:
                stop.set()
        return result
    finally:
        db.close()
        store.close()
