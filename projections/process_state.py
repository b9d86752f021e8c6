"""Saved states of processes that keep state from the event log (the routing process), one row
per name in the read-model database: the state as of a log position, so that a restart reads
only the log after it. Like a projection, it is derived from the log and can be dropped at any
time: the process then reads the whole log again.

Beside a state, the records it set aside (the routing process's resolved conversations): kept
here instead of in the process's memory, one row per name and key, written in the same
transaction as the state that no longer holds them, and read back one at a time when the log
needs one again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from projections.db import ReadModelDB, replace_on_conflict
from projections.tracking import now

TABLE = "process_states"
SET_ASIDE = "process_records"
_SET_ASIDE_COLUMNS = ("name", "key", "position", "record")
_CHUNK = 500  # keys per query (SQLite allows 32,766 parameters; a batch rarely needs many)


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
            tx.execute(
                f"CREATE TABLE IF NOT EXISTS {SET_ASIDE} (name TEXT NOT NULL, "
                f"key TEXT NOT NULL, position BIGINT NOT NULL, record {blob} NOT NULL, "
                "PRIMARY KEY (name, key))"
            )

    def latest(self, name: str) -> tuple[int, bytes] | None:
        with self.db.read() as tx:
            tx.execute(f"SELECT position, state FROM {TABLE} WHERE name=?", (name,))
            row = tx.fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def save(
        self,
        name: str,
        position: int,
        state: bytes,
        set_aside: Mapping[str, bytes] | None = None,
        *,
        replace: bool = False,
    ) -> None:
        """Saves `state` as of `position` with the records it set aside (by key); `replace`:
        drop the records set aside before (a state that does not follow from the last one,
        such as one built by reading the whole log again)."""
        with self.db.transaction() as tx:
            if replace:
                tx.execute(f"DELETE FROM {SET_ASIDE} WHERE name=?", (name,))
            tx.insert_many(
                SET_ASIDE,
                _SET_ASIDE_COLUMNS,
                [(name, key, position, record) for key, record in (set_aside or {}).items()],
                replace_on_conflict("name, key", _SET_ASIDE_COLUMNS),
            )
            tx.execute(
                f"INSERT INTO {TABLE} (name, position, saved_at, state) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET position=excluded.position, "
                "saved_at=excluded.saved_at, state=excluded.state",
                (name, position, now(), state),
            )

    def set_aside(self, name: str, keys: Collection[str]) -> dict[str, tuple[int, bytes]]:
        """The records set aside under these keys (those there are): by key, the position of
        the state each was set aside with, and the record."""
        found: dict[str, tuple[int, bytes]] = {}
        wanted = sorted(keys)
        with self.db.read() as tx:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                tx.execute(
                    f"SELECT key, position, record FROM {SET_ASIDE} "
                    f"WHERE name=? AND key IN ({', '.join('?' * len(chunk))})",
                    (name, *chunk),
                )
                found.update((key, (int(at), bytes(record))) for key, at, record in tx.fetchall())
        return found
