"""The read-model database: a SQLite file beside the event store, or the event store's own
PostgreSQL database.

One small API for every projection and for the HTTP API (which calls it from threads):

    with db.transaction() as tx:        # a write transaction (SQLite: BEGIN IMMEDIATE)
        tx.execute("UPDATE t SET a=? WHERE id=?", (1, "x"))
    with db.read() as tx:               # a read-only snapshot
        rows = tx.execute("SELECT a, b FROM t").fetchall()

Placeholders are `?` on both backends (translated to `%s` for psycopg); rows are tuples.
SQLite gets one connection per thread; PostgreSQL a small connection pool.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg_pool import ConnectionPool

from infra.settings import Settings

Row = tuple[Any, ...]
Params = Sequence[Any]

# Errors a caller may see when a concurrent writer or a dropped generation got in the way.
DatabaseError: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
IntegrityError: tuple[type[Exception], ...] = (sqlite3.IntegrityError, psycopg.IntegrityError)


class Tx(Protocol):
    """A cursor in a transaction: `?` placeholders, tuple rows."""

    @property
    def is_postgres(self) -> bool: ...

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Params = ()) -> Tx: ...

    def executemany(self, sql: str, params_seq: Sequence[Params]) -> None: ...

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Params], tail: str = ""
    ) -> None:
        """`INSERT INTO table (columns) <rows> tail` (`tail`: an ON CONFLICT clause). No two
        rows may have the same key when `tail` updates: one PostgreSQL statement cannot
        update a row twice."""

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...


def replace_on_conflict(key: str, columns: Sequence[str]) -> str:
    """The `insert_many` tail that makes it an upsert: a row with the same `key` (one column,
    or several separated by commas) takes the new values of every other column."""
    keys = {k.strip() for k in key.split(",")}
    sets = ", ".join(f"{c}=excluded.{c}" for c in columns if c not in keys)
    return f"ON CONFLICT ({key}) DO UPDATE SET {sets}"


@lru_cache(maxsize=1024)
def to_psycopg(sql: str) -> str:
    """`?` placeholders to `%s`; a literal `%` doubled (queries always go with parameters)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _SQLiteTx:
    is_postgres = False

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def execute(self, sql: str, params: Params = ()) -> _SQLiteTx:
        self._cursor.execute(sql, params)
        return self

    def executemany(self, sql: str, params_seq: Sequence[Params]) -> None:
        if params_seq:
            self._cursor.executemany(sql, params_seq)

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Params], tail: str = ""
    ) -> None:
        if rows:
            marks = ", ".join("?" * len(columns))
            self._cursor.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) {tail}", rows
            )

    def fetchone(self) -> Row | None:
        row: Row | None = self._cursor.fetchone()
        return row

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()


class _PostgresTx:
    is_postgres = True

    def __init__(
        self, cursor: psycopg.Cursor[Row], column_types: dict[str, dict[str, str]]
    ) -> None:
        self._cursor = cursor
        self._column_types = column_types  # the database's, shared by its transactions

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def execute(self, sql: str, params: Params = ()) -> _PostgresTx:
        self._cursor.execute(to_psycopg(sql), tuple(params))
        return self

    def executemany(self, sql: str, params_seq: Sequence[Params]) -> None:
        if params_seq:
            self._cursor.executemany(to_psycopg(sql), [tuple(p) for p in params_seq])

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Params], tail: str = ""
    ) -> None:
        """One statement for all the rows, sent as one array per column: psycopg writes
        arrays of plain values in C, where `executemany` spent 20-40 us of Python per row."""
        if not rows:
            return
        types = self._types(table)
        arrays = ", ".join(f"%b::{types[c]}[]" for c in columns)
        self._cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
            + to_psycopg(tail),
            [list(column) for column in zip(*rows, strict=True)],
        )

    def _types(self, table: str) -> dict[str, str]:
        types = self._column_types.get(table)
        if types is None:
            self._cursor.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (table,),
            )
            types = self._column_types[table] = dict(self._cursor.fetchall())
        return types

    def fetchone(self) -> Row | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()


class ReadModelDB:
    """The read models' database. Thread-safe: each thread gets its own connection."""

    def __init__(self, *, sqlite_path: Path | None = None, postgres_url: str | None = None):
        if (sqlite_path is None) == (postgres_url is None):
            raise ValueError("give exactly one of sqlite_path and postgres_url")
        self.is_postgres = postgres_url is not None
        # How to open the same database elsewhere: `ReadModelDB(**db.location)`.
        self.location: dict[str, Any] = {"sqlite_path": sqlite_path, "postgres_url": postgres_url}
        self._sqlite_path = sqlite_path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sqlite_connections: list[sqlite3.Connection] = []
        self._pool: Any = None
        # table -> column -> type, for insert_many (a table's name is never reused for
        # another layout: generations only count up)
        self._column_types: dict[str, dict[str, str]] = {}
        if postgres_url is not None:
            self._pool = ConnectionPool(
                postgres_url, min_size=1, max_size=8, open=True, name="read-models"
            )
        else:
            assert sqlite_path is not None
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            with self.transaction() as tx:  # creates the file and turns WAL on
                tx.execute("SELECT 1")

    # -- SQLite -------------------------------------------------------------------------

    def _sqlite(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            assert self._sqlite_path is not None
            conn = sqlite3.connect(
                self._sqlite_path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA cache_size=-65536")
            # Rarer checkpoints: a batch rewrites pages all over its tables (random ids).
            conn.execute("PRAGMA wal_autocheckpoint=16384")
            self._local.conn = conn
            with self._lock:
                self._sqlite_connections.append(conn)
        return conn

    @contextmanager
    def _sqlite_tx(self, begin: str) -> Iterator[Tx]:
        conn = self._sqlite()
        cursor = conn.cursor()
        cursor.execute(begin)
        try:
            yield _SQLiteTx(cursor)
        except BaseException:
            conn.rollback()
            raise
        else:
            conn.commit()
        finally:
            cursor.close()

    # -- PostgreSQL ---------------------------------------------------------------------

    @contextmanager
    def _postgres_tx(self, *, read_only: bool) -> Iterator[Tx]:
        with self._pool.connection() as conn:
            conn.read_only = read_only
            # The pool's connection block commits on success and rolls back on error.
            with conn.cursor() as cursor:
                yield _PostgresTx(cursor, self._column_types)

    # -- the API ------------------------------------------------------------------------

    @contextmanager
    def _outermost(self, read_only: bool) -> Iterator[Tx]:
        current: Tx | None = getattr(self._local, "tx", None)
        if current is not None:
            # A block inside another on the same thread joins its transaction.
            yield current
            return
        if self.is_postgres:
            opened = self._postgres_tx(read_only=read_only)
        else:
            opened = self._sqlite_tx("BEGIN" if read_only else "BEGIN IMMEDIATE")
        with opened as tx:
            self._local.tx = tx
            try:
                yield tx
            finally:
                self._local.tx = None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back on an error.
        A block opened inside another on the same thread joins the outer transaction."""
        with self._outermost(read_only=False) as tx:
            yield tx

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction (on SQLite a consistent snapshot)."""
        with self._outermost(read_only=True) as tx:
            yield tx

    def table_exists(self, table: str) -> bool:
        with self.read() as tx:
            if self.is_postgres:
                tx.execute("SELECT to_regclass(?) IS NOT NULL", (table,))
            else:
                tx.execute(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?", (table,)
                )
            row = tx.fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        with self._lock:
            for conn in self._sqlite_connections:
                conn.close()
            self._sqlite_connections.clear()
        self._local = threading.local()

    def __enter__(self) -> ReadModelDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_read_models(settings: Settings) -> ReadModelDB:
    """The read models beside the event store: `Settings.views_path`, or the same PostgreSQL
    database as the store."""
    if settings.is_postgres:
        return ReadModelDB(postgres_url=settings.database_url)
    return ReadModelDB(sqlite_path=settings.views_path)
