"""Ports the application owns; infra/ implements them for SQLite, PostgreSQL and Kafka."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import Notification, Tracking

from inbox.contact import ContactEvent


class ContactEventSource(Protocol):
    """Where a contact event was read: recorded with the domain events it caused."""

    @property
    def event_id(self) -> str: ...

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


class EventStorePort(Protocol):
    def get(self, aggregate_id: UUID) -> Any: ...

    def events_of(self, aggregate_id: UUID) -> list[CanMutateAggregate[UUID]]: ...

    def record(
        self,
        events: Iterable[CanMutateAggregate[UUID]],
        *,
        trackings: Sequence[Tracking] = (),
        contact_events: Sequence[Any] = (),
        aggregates: Iterable[Any] = (),
    ) -> Sequence[int]: ...

    def save(self, *aggregates: Any) -> Sequence[int]: ...

    def notifications(
        self, after: int, limit: int, *, topics: Sequence[str] = ()
    ) -> Sequence[Notification]: ...

    def max_notification_id(self) -> int: ...

    def position(self, name: str) -> int | None: ...

    def seen_event_ids(self, event_ids: Sequence[str]) -> set[str]: ...

    def existing_ids(self, aggregate_ids: Sequence[UUID]) -> set[UUID]: ...


class Publisher(Protocol):
    """Produces contact events to Kafka; returns once the broker acknowledged, raises
    adapters.kafka.PublishFailed otherwise."""

    async def publish(self, event: ContactEvent) -> None: ...


class ProcessStates(Protocol):
    """Where a process that keeps state from the event log saves it, by name: the state as of
    a log position, and the records it set aside instead of keeping them in memory
    (projections.process_state)."""

    def latest(self, name: str) -> tuple[int, bytes] | None: ...

    def save(
        self,
        name: str,
        position: int,
        state: bytes,
        set_aside: Mapping[str, bytes] | None = None,
        *,
        replace: bool = False,
    ) -> None: ...

    def set_aside(self, name: str, keys: Collection[str]) -> dict[str, tuple[int, bytes]]: ...
