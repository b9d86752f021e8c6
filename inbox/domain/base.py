"""The aggregate base: eventsourcing's Aggregate with a leaner path for recording events.

The ingest worker records about two events per contact event; eventsourcing's generic
`_create`/`trigger_event` spend most of their time re-deriving things that are fixed per class
(topics, which keyword arguments go where). The semantics are eventsourcing's: a created event
builds the aggregate, every event gets the next version, state changes only in `apply`.
Aggregates rebuilt from the store go through eventsourcing's own `mutate`, unchanged.
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any, Self
from uuid import UUID

from eventsourcing.domain import Aggregate, CanInitAggregate, CanMutateAggregate
from eventsourcing.utils import get_topic

_topics: dict[type, str] = {}
_id_params: dict[type, tuple[str, ...]] = {}


def _topic(cls: type) -> str:
    topic = _topics.get(cls)
    if topic is None:
        topic = _topics[cls] = get_topic(cls)
    return topic


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
        created = event_class(  # type: ignore[call-arg]
            originator_topic=_topic(cls),
            originator_id=originator_id,
            originator_version=cls.INITIAL_VERSION,
            timestamp=timestamp,
            **kwargs,
        )
        aggregate = object.__new__(cls)
        aggregate.__base_init__(originator_id, cls.INITIAL_VERSION, timestamp)
        aggregate.__init__(**kwargs)  # type: ignore[misc]
        created.apply(aggregate)
        aggregate._pending_events.append(created)
        return aggregate

    def trigger_event(self, event_class: type[CanMutateAggregate[UUID]], **kwargs: Any) -> None:
        timestamp = kwargs.pop("timestamp", None) or datetime.now(UTC)
        event = event_class(  # type: ignore[call-arg]
            originator_id=self._id,
            originator_version=self._version + 1,
            timestamp=timestamp,
            **kwargs,
        )
        event.apply(self)
        self._version = event.originator_version
        self._modified_on = timestamp
        self._pending_events.append(event)
