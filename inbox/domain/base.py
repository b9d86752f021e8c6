"""The aggregate base: eventsourcing's Aggregate with a leaner path for recording events.

The ingest worker records about two events per contact event; eventsourcing's generic
`_create`/`trigger_event` spend most of their time re-deriving things that are fixed per class
(topics, which keyword arguments go where), and a frozen dataclass's `__init__` sets each field
through `object.__setattr__`. The semantics are eventsourcing's: a created event builds the
aggregate, every event gets the next version, state changes only in `apply`, and an event holds
exactly its declared fields. Aggregates rebuilt from the store go through eventsourcing's own
`mutate`, unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from datetime import UTC, datetime
from typing import Any, Self
from uuid import UUID

from eventsourcing.domain import Aggregate, CanInitAggregate, CanMutateAggregate, DomainEvent
from eventsourcing.utils import get_topic

_topics: dict[type, str] = {}
_id_params: dict[type, tuple[str, ...]] = {}
# Field names, or None when the class needs its dataclass __init__ (defaults to fill in, or a
# __post_init__ of its own).
_fields: dict[type, frozenset[str] | None] = {}


def _topic(cls: type) -> str:
    topic = _topics.get(cls)
    if topic is None:
        topic = _topics[cls] = get_topic(cls)
    return topic


def _plain_fields(event_class: type) -> frozenset[str] | None:
    fields = dataclasses.fields(event_class)
    has_defaults = any(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in fields
    )
    own_checks = event_class.__post_init__ is not DomainEvent.__post_init__  # type: ignore[attr-defined]
    return None if has_defaults or own_checks else frozenset(f.name for f in fields)


def new_event(event_class: type[Any], values: dict[str, Any]) -> Any:
    """The event `event_class(**values)` would make, without the frozen dataclass's
    field-by-field `__init__`; `values` becomes the event's `__dict__` (the caller hands it
    over). Any call it cannot vouch for (a missing or unknown field, a class with defaults or
    its own checks) goes to the dataclass, which fills in or refuses."""
    try:
        names = _fields[event_class]
    except KeyError:
        names = _fields[event_class] = _plain_fields(event_class)
    if names is None or values.keys() != names or type(values["originator_id"]) is not UUID:
        # (DomainEvent.__post_init__ refuses an originator id that is not a UUID.)
        return event_class(**values)
    event = object.__new__(event_class)
    object.__setattr__(event, "__dict__", values)
    return event


class DomainAggregate(Aggregate):
    @classmethod
    def _create(
        cls,
        event_class: type[CanInitAggregate[UUID]],
        *,
        id: UUID | None = None,
        **kwargs: Any,
    ) -> Self:
        if id is None:
            params = _id_params.get(cls)
            if params is None:
                params = _id_params[cls] = tuple(inspect.signature(cls.create_id).parameters)
            originator_id = cls.create_id(**{name: kwargs[name] for name in params})
        else:
            originator_id = id
        timestamp = kwargs.pop("timestamp", None) or datetime.now(UTC)
        created = new_event(
            event_class,
            {
                "originator_topic": _topic(cls),
                "originator_id": originator_id,
                "originator_version": cls.INITIAL_VERSION,
                "timestamp": timestamp,
                **kwargs,
            },
        )
        aggregate = object.__new__(cls)
        aggregate.__base_init__(originator_id, cls.INITIAL_VERSION, timestamp)
        aggregate.__init__(**kwargs)  # type: ignore[misc]
        created.apply(aggregate)
        aggregate._pending_events.append(created)
        return aggregate

    def trigger_event(self, event_class: type[CanMutateAggregate[UUID]], **kwargs: Any) -> None:
        timestamp = kwargs.pop("timestamp", None) or datetime.now(UTC)
        version = self._version + 1
        event = new_event(
            event_class,
            {"originator_id": self._id, "originator_version": version, "timestamp": timestamp}
            | kwargs,
        )
        event.apply(self)
        self._version = version
        self._modified_on = timestamp
        self._pending_events.append(event)
