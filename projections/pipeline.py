"""A rebuild's writes in a second process, so that it uses both cores.

A long rebuild of a `Pipelined` projection (the metrics) decides batch N+1 in the rebuilding
process while a writer process writes batch N: its rows and its position, in one transaction,
as `runner.apply_batch` would. At most `DEPTH` batches are sent and not yet committed; the
rebuild moves the projection's in-memory state on as soon as a batch is sent. A writer that
fails (or is killed) fails the rebuild, which then resumes from the last committed batch.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from projections.base import Pipelined
from projections.db import ReadModelDB, Tx
from projections.runner import Record, decode, gc_paused, record_id
from projections.tracking import PositionConflict, advance

# Batches sent and not yet committed: two keep the writer busy while the next one is decided.
DEPTH = 2


class Writer:
    """The writer process of one rebuild of one generation."""

    def __init__(self, db: ReadModelDB, projection: Pipelined, name: str, generation: int):
        self.db = db
        self.projection = projection
        self.name = name
        self.generation = generation
        # spawn, not fork: the rebuilding process may have threads (`inbox serve`).
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(db.location, name, generation, projection.write, theirs),
            name=f"rebuild-writer-{name}",
            daemon=True,
        )
        self.process.start()
        theirs.close()
        self._sent: deque[tuple[int, int]] = deque()  # (new position, notifications)
        self.committed = 0  # notifications whose batches the writer has committed

    def apply(self, position: int, records: Sequence[Record]) -> int:
        """Decides the changes of the records read after `position` and sends them to be
        written; returns the new position (committed later: see `drain`)."""
        if not records:
            return position
        proj = self.projection
        new_position = records[-1][0]
        with gc_paused():
            events = decode(records, proj.handles)
        if not proj.remembers(self.generation, position):
            self.drain()  # it reads the tables: they must hold what was sent
        with gc_paused(), self.db.read() as tx:
            changes = proj.prepare(tx, self.generation, events, position=position)
        while len(self._sent) >= DEPTH:
            self._acknowledged()
        try:
            self._conn.send((position, new_position, record_id(records[-1]), changes))
        except OSError:
            raise self._ended(new_position) from None
        self._sent.append((new_position, len(records)))
        proj.committed(self.generation, new_position)
        return new_position

    def drain(self) -> None:
        """Waits until every batch sent is committed (raises what the writer raised)."""
        while self._sent:
            self._acknowledged()

    def _acknowledged(self) -> None:
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._ended(self._sent[0][0]) from None
        if isinstance(reply, int):
            self.committed += self._sent.popleft()[1]
            return
        kind, message = reply
        if kind == "conflict":
            raise PositionConflict(message)
        raise RuntimeError(f"the writer process of the {self.name} rebuild failed:\n{message}")

    def _ended(self, position: int) -> RuntimeError:
        self.process.join(5)
        return RuntimeError(
            f"the writer process of the {self.name} rebuild ended "
            f"(exit code {self.process.exitcode}) before committing position {position}"
        )

    def close(self) -> None:
        """Stops the writer: after the batches it has, or at once when it is stuck."""
        with contextlib.suppress(OSError):  # it has gone already
            self._conn.send(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


def _serve(
    location: dict[str, Any],
    name: str,
    generation: int,
    write: Callable[[Tx, int, Any], None],
    conn: Connection,
) -> None:
    """The writer process: each batch's changes and position in one transaction."""
    gc.disable()  # it holds no cycles, and a batch allocates a great many small objects
    db = ReadModelDB(**location)
    try:
        while (item := conn.recv()) is not None:
            position, new_position, record, changes = item
            try:
                with db.transaction() as tx:
                    advance(
                        tx,
                        name,
                        generation,
                        position,
                        new_position,
                        require_active=False,
                        record=record,
                    )
                    write(tx, generation, changes)
            except PositionConflict as error:
                conn.send(("conflict", str(error)))
                return
            except Exception:  # noqa: BLE001 (not hidden: the rebuild raises it)
                conn.send(("error", traceback.format_exc()))
                return
            conn.send(new_position)
    except (EOFError, KeyboardInterrupt):
        pass  # the rebuild stopped: the batch being written, if any, was rolled back
    finally:
        db.close()
