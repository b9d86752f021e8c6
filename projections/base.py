"""What a projection is, and the decoded events it is given.

A projection owns a few tables, named with its generation suffix (`inbox_conversations_g3`),
and turns a batch of events into writes on them. It never commits and never touches its
position: the runner writes rows and position in one transaction (see `tracking`), then
tells the projection whether that transaction committed (`committed`) or not (`forget`), so
a projection may keep rows in memory between batches for as long as nobody else wrote them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from projections.db import Tx


class Event(NamedTuple):
    """One notification of the event store, decoded."""

    notification_id: int
    name: str  # "Conversation.MessageReceived": the topic after the module
    originator_id: str
    version: int
    state: dict[str, Any]


class Projection(Protocol):
    name: str
    # Event names (`Aggregate.Event`) the projection wants; others only move its position.
    handles: frozenset[str]

    def tables(self, generation: int) -> list[str]: ...

    def create_tables(self, tx: Tx, generation: int) -> None: ...

    def create_indexes(self, tx: Tx, generation: int) -> None:
        """Secondary indexes: created with a live generation, at the end of a rebuild."""

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        """Writes what `events` change. `position`: the generation's position before them (in
        this transaction), so in-memory state kept since `committed` can be checked."""

    def committed(self, generation: int, position: int) -> None:
        """The last `apply` was committed; the generation is now at `position`."""

    def forget(self) -> None:
        """The last `apply` was rolled back: drop whatever was kept in memory."""


@runtime_checkable
class Pipelined(Projection, Protocol):
    """A projection that decides a batch's changes apart from writing them, so that a long
    rebuild can write one batch in a second process while it decides the next
    (`projections.pipeline`). `apply` is `write(tx, generation, prepare(...))`."""

    def prepare(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> Any:
        """What `events` change, from the state kept since `committed` (rows it does not hold
        read through `tx`); `committed` or `forget` follows as after `apply`."""

    def remembers(self, generation: int, position: int) -> bool:
        """Whether `prepare` at `position` starts from state kept in memory; if not, it reads
        the tables, which must then hold every earlier batch's writes."""

    # Writes what `prepare` returned: a function of a module, so it can be pickled by name.
    write: Callable[[Tx, int, Any], None]


def table(name: str, generation: int) -> str:
    return f"{name}_g{generation}"
