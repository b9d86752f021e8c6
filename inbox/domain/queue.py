"""A queue: which work enters it (entry points and keyword rules), who may take it (skill,
channels, language), its default priority and its SLA policy. Defining or editing a queue is
an event, so routing and SLAs replay with the configuration that held at the time."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from inbox.domain import ids
from inbox.domain.base import DomainAggregate

DEFAULT_QUEUE = "default"


class Queue(DomainAggregate):
    class Defined(Aggregate.Created):
        """`spec`: name, skill, channels, language, priority, entry_points, keywords, sla."""

        class_version = 1
        name: str
        spec: dict[str, Any]
        actor: str
        at: str

    class Changed(Aggregate.Event):
        class_version = 1
        spec: dict[str, Any]
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.spec = dict(self.spec)

    @staticmethod
    def create_id(name: str) -> UUID:
        return ids.queue_id(name)

    def __init__(self, name: str, spec: dict[str, Any], actor: str, at: str) -> None:
        self.name = name
        self.spec = dict(spec)

    def change(self, spec: dict[str, Any], *, actor: str, at: str) -> bool:
        """Records the new spec; False when nothing changed."""
        if spec == self.spec:
            return False
        self.trigger_event(self.Changed, spec=spec, actor=actor, at=at)
        return True
