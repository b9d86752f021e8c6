"""The audit history: every domain event of a conversation or customer, in order, with who did
it, when, and the contact event (and Kafka position) it came from."""

from __future__ import annotations

from datetime import datetime
from functools import reduce
from typing import Any
from uuid import UUID

from inbox.domain.time import iso
from infra.store import EventStore
from projections.timeline import entry_for

_FROM_CUSTOMER = ("MessageReceived", "ActivityRecorded", "CsatSubmitted", "Opened")
_BASE_FIELDS = ("originator_id", "originator_version", "timestamp", "originator_topic")


def _actor(name: str, data: dict[str, Any]) -> str:
    if isinstance(data.get("actor"), str):
        return str(data["actor"])
    if name in _FROM_CUSTOMER and data.get("source_event_id"):
        return "customer"
    if name == "DeliveryStatusRecorded":
        return f"channel:{data.get('channel')}"
    return "system:ingest"


def history(store: EventStore, aggregate_id: UUID) -> list[dict[str, Any]]:
    """One aggregate's events, oldest first; [] when there is no such aggregate."""
    entries: list[dict[str, Any]] = []
    for event in store.events_of(aggregate_id):
        state = dict(vars(event))
        name = type(event).__qualname__
        data = {k: v for k, v in state.items() if k not in _BASE_FIELDS}
        entry: dict[str, Any] = {
            "aggregate": name.split(".")[0],
            "aggregate_id": str(aggregate_id),
            "type": name.split(".")[-1],
            "version": event.originator_version,
            "class_version": getattr(type(event), "class_version", 1),
            "timestamp": iso(event.timestamp),
            "at": data.get("at"),
            "actor": _actor(name.split(".")[-1], data),
            "data": data,
        }
        source_id = data.get("source_event_id")
        if isinstance(source_id, str):
            source = store.ingest.contact_event_source(source_id)
            entry["source"] = {
                "event_id": source_id,
                "kafka": None
                if source is None
                else {
                    "topic": source.topic,
                    "partition": source.partition,
                    "offset": source.offset,
                },
            }
        entries.append(entry)
    return entries


def customer_history(store: EventStore, customer_id: UUID) -> list[dict[str, Any]]:
    """The customer's events and those of every conversation they had, in time order."""
    own = history(store, customer_id)
    if not own:
        return []
    conversations: list[str] = []
    for entry in own:
        data = entry["data"]
        if entry["type"] == "ConversationStarted":
            conversations.append(data["conversation_id"])
        elif entry["type"] == "Merged":
            conversations.extend(data["conversations"])
    entries = list(own)
    for conversation in dict.fromkeys(conversations):
        entries.extend(history(store, UUID(conversation)))
    entries.sort(key=lambda e: (e["timestamp"], e["aggregate_id"], e["version"]))
    return entries


def conversation_as_of(
    store: EventStore, conversation_id: UUID, as_of: datetime
) -> dict[str, Any] | None:
    """The conversation as it stood at `as_of`: its state rebuilt from the events recorded
    up to then, and the timeline they made. None when it did not exist yet."""
    events = [e for e in store.events_of(conversation_id) if e.timestamp <= as_of]
    if not events or type(events[0]).__qualname__ != "Conversation.Opened":
        return None
    conversation: Any = reduce(lambda aggregate, event: event.mutate(aggregate), events, None)
    timeline = []
    for event in events:
        state = {k: v for k, v in vars(event).items() if k not in _BASE_FIELDS}
        name = type(event).__qualname__.split(".")[-1]
        kind, direction, data = entry_for(name, state)
        timeline.append(
            {
                "version": event.originator_version,
                "event": name,
                "kind": kind,
                "direction": direction,
                "channel": state.get("channel"),
                "at": state.get("at"),
                "text": state.get("text"),
                "source_event_id": state.get("source_event_id"),
                "actor": _actor(name, state),
                "data": data,
            }
        )
    return {
        "id": str(conversation_id),
        "as_of": iso(as_of),
        "version": conversation.version,
        "customer_id": conversation.customer_id,
        "status": conversation.status,
        "assignee": conversation.assignee,
        "queue": conversation.queue,
        "priority": conversation.priority,
        "escalated": conversation.escalated,
        "waiting_since": conversation.waiting_since,
        "timeline": timeline,
    }
