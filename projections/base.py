"""What a projection is, and the decoded events it is given.

A projection owns a few tables, named with its generation suffix (`inbox_conversations_g3`),
and turns a batch of events into writes on them. It never commits and never touches its
position: the runner writes rows and position in one transaction (see `tracking`), then
tells the projection whether that transaction committed (`committed`) or not (`forget`), so
a projection may keep rows in memory between batches for as long as nobody else wrote them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

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


class Held(Protocol):
    """Rows a projection holds in memory, as of `position` of `generation`."""

    generation: int
    position: int

    def size(self) -> int: ...


H = TypeVar("H", bound=Held)


class Kept(Generic[H]):
    """What a projection keeps in memory between batches: valid exactly while the
    generation's position is still the one its last commit wrote (the runner's conditional
    update says so: nobody else wrote in between). Dropped past `limit` (its `size`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: H | None = None
        self._pending: H | None = None

    def remembers(self, generation: int, position: int) -> bool:
        held = self.held
        return held is not None and held.generation == generation and held.position == position

    def take(self, generation: int, position: int, fresh: Callable[[], H]) -> H:
        """What a batch after `position` starts from: what was kept, or `fresh()` when
        another writer moved the generation since (or nothing was kept). Kept again once
        `committed`."""
        held = self.held
        if held is None or held.generation != generation or held.position != position:
            held = fresh()
        self.held, self._pending = None, held
        return held

    def committed(self, generation: int, position: int) -> None:
        held, self._pending = self._pending, None
        if held is not None and held.generation == generation and held.size() <= self.limit:
            held.position = position
            self.held = held

    def forget(self) -> None:
        self.held = self._pending = None


def table(name: str, generation: int) -> str:
    return f"{name}_g{generation}"
