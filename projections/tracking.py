"""Generations and tracking positions: the `projection_state` table.

One row per (projection, generation). At most one generation of a projection is `active`
(serving reads and followed by the live runner); a rebuild fills a newer one beside it and
swaps it in when it has caught up. The position is advanced in the same transaction as the
rows, with a conditional update, so two writers of one generation never both apply a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from projections.base import Projection
from projections.db import IntegrityError, ReadModelDB, Tx

STATE_TABLE = "projection_state"


class PositionConflict(Exception):
    """Another writer moved the position of this generation first; nothing was written."""


@dataclass(frozen=True)
class GenerationState:
    name: str
    generation: int
    position: int
    active: bool
    started_at: str
    finished_at: str | None
    retired_at: str | None


def now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def ensure_state_table(db: ReadModelDB) -> None:
    with db.transaction() as tx:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
            "name TEXT NOT NULL, generation INTEGER NOT NULL, position BIGINT NOT NULL, "
            "active INTEGER NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, "
            "retired_at TEXT, updated_at TEXT, PRIMARY KEY (name, generation))"
        )


_COLUMNS = "name, generation, position, active, started_at, finished_at, retired_at"


def _state(row: tuple[object, ...]) -> GenerationState:
    return GenerationState(
        name=str(row[0]),
        generation=int(str(row[1])),
        position=int(str(row[2])),
        active=bool(row[3]),
        started_at=str(row[4]),
        finished_at=None if row[5] is None else str(row[5]),
        retired_at=None if row[6] is None else str(row[6]),
    )


def generations(tx: Tx, name: str) -> list[GenerationState]:
    tx.execute(f"SELECT {_COLUMNS} FROM {STATE_TABLE} WHERE name=? ORDER BY generation", (name,))
    return [_state(row) for row in tx.fetchall()]


def active_generation(tx: Tx, name: str) -> GenerationState | None:
    tx.execute(f"SELECT {_COLUMNS} FROM {STATE_TABLE} WHERE name=? AND active=1", (name,))
    row = tx.fetchone()
    return None if row is None else _state(row)


def generation_state(tx: Tx, name: str, generation: int) -> GenerationState | None:
    tx.execute(
        f"SELECT {_COLUMNS} FROM {STATE_TABLE} WHERE name=? AND generation=?", (name, generation)
    )
    row = tx.fetchone()
    return None if row is None else _state(row)


def active_table(tx: Tx, projection: str, table: str) -> str | None:
    """`table_gN` of the active generation of `projection`, or None before its first run."""
    tx.execute(f"SELECT generation FROM {STATE_TABLE} WHERE name=? AND active=1", (projection,))
    row = tx.fetchone()
    return None if row is None else f"{table}_g{row[0]}"


def new_generation(db: ReadModelDB, projection: Projection, *, active: bool) -> GenerationState:
    """Creates the next generation's row and tables (with indexes when it starts active)."""
    for _ in range(5):
        try:
            with db.transaction() as tx:
                tx.execute(
                    f"SELECT COALESCE(MAX(generation), 0) FROM {STATE_TABLE} WHERE name=?",
                    (projection.name,),
                )
                row = tx.fetchone()
                generation = int(row[0]) + 1 if row else 1
                started = now()
                tx.execute(
                    f"INSERT INTO {STATE_TABLE} ({_COLUMNS}, updated_at) "
                    "VALUES (?, ?, 0, ?, ?, ?, NULL, ?)",
                    (
                        projection.name,
                        generation,
                        int(active),
                        started,
                        started if active else None,
                        started,
                    ),
                )
                projection.create_tables(tx, generation)
                if active:
                    projection.create_indexes(tx, generation)
            return GenerationState(
                projection.name, generation, 0, active, started, started if active else None, None
            )
        except IntegrityError:
            continue  # another process took this generation number at the same moment
    raise RuntimeError(f"could not create a generation of {projection.name}")


def ensure_active(db: ReadModelDB, projection: Projection) -> GenerationState:
    """The active generation, created (as generation 1, or the next) on first use."""
    with db.read() as tx:
        state = active_generation(tx, projection.name)
    if state is not None:
        return state
    for _ in range(5):
        created = new_generation(db, projection, active=True)
        with db.transaction() as tx:
            # Two processes may have raced to create the first generation: keep the lowest.
            tx.execute(
                f"SELECT MIN(generation) FROM {STATE_TABLE} WHERE name=? AND active=1",
                (projection.name,),
            )
            row = tx.fetchone()
            winner = int(row[0]) if row and row[0] is not None else created.generation
            if winner != created.generation:
                tx.execute(
                    f"UPDATE {STATE_TABLE} SET active=0, retired_at=? "
                    "WHERE name=? AND generation=?",
                    (now(), projection.name, created.generation),
                )
            current = active_generation(tx, projection.name)
        if winner != created.generation:
            drop_generation(db, projection, created.generation)
        if current is not None:
            return current
    raise RuntimeError(f"no active generation of {projection.name}")


def advance(
    tx: Tx, name: str, generation: int, expected: int, position: int, *, require_active: bool
) -> None:
    """Moves the position from `expected` to `position`, or raises PositionConflict."""
    sql = (
        f"UPDATE {STATE_TABLE} SET position=?, updated_at=? "
        "WHERE name=? AND generation=? AND position=?"
    )
    if require_active:
        sql += " AND active=1"
    tx.execute(sql, (position, now(), name, generation, expected))
    if tx.rowcount != 1:
        raise PositionConflict(f"{name} generation {generation} is no longer at {expected}")


def drop_generation(db: ReadModelDB, projection: Projection, generation: int) -> None:
    with db.transaction() as tx:
        for name in projection.tables(generation):
            tx.execute(f"DROP TABLE IF EXISTS {name}")
        tx.execute(
            f"UPDATE {STATE_TABLE} SET active=0, retired_at=COALESCE(retired_at, ?) "
            "WHERE name=? AND generation=?",
            (now(), projection.name, generation),
        )


def positions(db: ReadModelDB) -> dict[str, int]:
    """The position of each projection's active generation (for `inbox_projection_position`)."""
    ensure_state_table(db)
    with db.read() as tx:
        return active_positions(tx)


def active_positions(tx: Tx) -> dict[str, int]:
    tx.execute(f"SELECT name, position FROM {STATE_TABLE} WHERE active=1")
    return {str(name): int(position) for name, position in tx.fetchall()}
