"""Saved states of processes that keep state from the event log (the routing process), one row
per name in the read-model database: the state as of a log position, so that a restart reads
only the log after it. Like a projection, it is derived from the log and can be dropped at any
time: the process then reads the whole log again.
"""

from __future__ import annotations

from projections.db import ReadModelDB
from projections.tracking import now

TABLE = "process_states"


class ReadModelProcessStates:
    """`ProcessStates` in the read-model database (SQLite or PostgreSQL)."""

    def __init__(self, db: ReadModelDB) -> None:
        self.db = db
        blob = "BYTEA" if db.is_postgres else "BLOB"
        with db.transaction() as tx:
            tx.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (name TEXT PRIMARY KEY, "
                f"position BIGINT NOT NULL, saved_at TEXT NOT NULL, state {blob} NOT NULL)"
            )

    def latest(self, name: str) -> tuple[int, bytes] | None:
        with self.db.read() as tx:
            tx.execute(f"SELECT position, state FROM {TABLE} WHERE name=?", (name,))
            row = tx.fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def save(self, name: str, position: int, state: bytes) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                f"INSERT INTO {TABLE} (name, position, saved_at, state) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET position=excluded.position, "
                "saved_at=excluded.saved_at, state=excluded.state",
                (name, position, now(), state),
            )
