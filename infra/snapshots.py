"""Stored snapshots of aggregates, so that loading one replays at most `SNAPSHOT_EVERY` events.

An agent's aggregate grows with every presence change, and it is loaded for each one (20,050
events: 252 ms to replay, about 1 ms from a snapshot; `python -m bench.aggregates`). A
snapshot is the aggregate's state as JSON at a version, in a table of its own beside the
events (eventsourcing's aggregate recorder, as its own snapshotting does). Events stay the
truth: a snapshot is only ever a shortcut to a state the events give.

- A snapshot is taken when recording an aggregate's events (a command's save, or a batch of
  the ingest worker) moves it past a multiple of `SNAPSHOT_EVERY`, and only when its state
  survives JSON unchanged (no sets, tuples or datetimes in it).
- It is used only by the same domain code that took it: each carries a fingerprint of
  `inbox.domain`'s source and eventsourcing's version, and one taken by other code is
  ignored. A change to how an aggregate derives its state needs no migration.
- Erasing personal data (`EventStore.rewrite`) deletes the aggregate's snapshots in the same
  transaction.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import AggregateRecorder, IntegrityError, StoredEvent
from eventsourcing.utils import get_topic, resolve_topic

import inbox.domain
from inbox.fingerprint import source_fingerprint

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 100
# Kept by eventsourcing's base aggregate, restored from the row and the snapshot's header.
_BASE = frozenset({"_id", "_version", "_created_on", "_modified_on", "_pending_events"})


@cache
def domain_fingerprint() -> str:
    """What a snapshot's state was derived by: the domain package's source and the
    eventsourcing release (its base aggregate applies events too)."""
    return source_fingerprint(
        version("eventsourcing"), Path(inbox.domain.__file__).parent, ["*.py"]
    )


class Snapshots:
    def __init__(self, recorder: AggregateRecorder, *, every: int = SNAPSHOT_EVERY) -> None:
        self.recorder = recorder
        self.table: str = recorder.events_table_name  # type: ignore[attr-defined]
        self.every = every
        self.code = domain_fingerprint()

    def take(self, aggregate: Any) -> bool:
        """Stores the aggregate's state at its version; False when the state would not come
        back the same from JSON, or the snapshot exists already."""
        state = {k: v for k, v in vars(aggregate).items() if k not in _BASE}
        try:
            encoded = orjson.dumps(
                {
                    "code": self.code,
                    "created_on": aggregate.created_on.isoformat(),
                    "modified_on": aggregate.modified_on.isoformat(),
                    "state": state,
                }
            )
        except orjson.JSONEncodeError:
            return False
        if orjson.loads(encoded)["state"] != state:
            return False
        snapshot = StoredEvent(aggregate.id, aggregate.version, get_topic(type(aggregate)), encoded)
        try:
            self.recorder.insert_events([snapshot])
        except IntegrityError:
            return False  # another writer took the same version's: the same state
        return True

    def latest(self, aggregate_id: UUID) -> Any:
        """The aggregate as of its latest snapshot this code took, or None."""
        for row in self.recorder.select_events(aggregate_id, desc=True, limit=1):
            try:
                stored = orjson.loads(row.state)
                if stored["code"] != self.code:
                    return None
                aggregate = object.__new__(resolve_topic(row.topic))
                vars(aggregate).update(stored["state"])
                aggregate._created_on = datetime.fromisoformat(stored["created_on"])
                aggregate._modified_on = datetime.fromisoformat(stored["modified_on"])
            except (orjson.JSONDecodeError, LookupError, TypeError, ValueError):
                # Never in the way of loading: the events are there.
                log.warning("unreadable snapshot of %s ignored", aggregate_id, exc_info=True)
                return None
            aggregate._id = aggregate_id
            aggregate._version = row.originator_version
            aggregate._pending_events = []
            return aggregate
        return None
