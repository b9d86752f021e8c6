"""The conversation timeline: every conversation event as an entry, in order, across channels.

Table (generation N): `timeline_entries_gN`, primary key (conversation_id, version): insert
only, one row per conversation event. Each entry: `kind` (message | call | ivr | note | status
| callback | delivery | csat), `direction` (in | out where it applies), `channel`, `at`,
`text` (messages and notes), `source_event_id` (the contact event it came from), `actor`
where known, `event` (the domain event's name) and `data` (the event's other fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from projections.base import Event, table
from projections.db import ReadModelDB, Tx
from projections.inbox_view import conversations_of, get_item
from projections.tracking import active_table

NAME = "timeline"
ENTRIES = "timeline_entries"

_STATUS_EVENTS = frozenset(
    {
        "Opened",
        "Assigned",
        "Transferred",
        "Escalated",
        "MarkedPending",
        "Resolved",
        "Reopened",
        "Queued",
        "PriorityChanged",
        "Offered",
        "OfferLapsed",
        "SlaWarned",
        "SlaBreached",
    }
)
# Fields that have a column of their own (or say nothing an entry needs).
_COMMON = frozenset(
    {"timestamp", "originator_topic", "at", "channel", "text", "source_event_id", "actor"}
)
_COLUMNS = (
    "conversation_id",
    "version",
    "notification_id",
    "event",
    "kind",
    "direction",
    "channel",
    "at",
    "text",
    "source_event_id",
    "actor",
    "data",
)


def entry_for(event_name: str, state: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """(kind, direction, data) of a conversation event (`Opened`, `MessageReceived`, ...)."""
    data = {k: v for k, v in state.items() if k not in _COMMON}
    if event_name == "MessageReceived":
        return "message", "in", data
    if event_name == "ReplyQueued":
        return "message", "out", data
    if event_name == "ActivityRecorded":
        activity: str = state["activity"]
        payload = data.pop("data", None) or {}
        data = {**payload, **data}
        prefix = activity.partition(".")[0]
        if prefix == "call":
            # a callback's call is ours, placed by the dialer
            return "call", "out" if payload.get("direction") == "outbound" else "in", data
        if prefix == "ivr":
            return "ivr", "in", data
        if prefix == "callback":
            return "callback", "in", data
        return "status", None, data  # chat.started, chat.ended
    if event_name == "NoteAdded":
        return "note", None, data
    if event_name == "DeliveryStatusRecorded":
        return "delivery", "out", data
    if event_name == "CsatSubmitted":
        return "csat", "in", data
    if event_name == "SurveyQueued":
        return "csat", "out", data
    if event_name in _STATUS_EVENTS:
        data["change"] = event_name
        if event_name == "Opened":
            data["status"] = "open"
        return "status", None, data
    return "status", None, data


class Timeline:
    name = NAME
    handles = frozenset(
        {
            "Conversation.Opened",
            "Conversation.MessageReceived",
            "Conversation.ActivityRecorded",
            "Conversation.DeliveryStatusRecorded",
            "Conversation.CsatSubmitted",
            "Conversation.NoteAdded",
            "Conversation.ReplyQueued",
            "Conversation.Assigned",
            "Conversation.Transferred",
            "Conversation.Escalated",
            "Conversation.MarkedPending",
            "Conversation.Resolved",
            "Conversation.Reopened",
            "Conversation.SurveyQueued",
            "Conversation.Queued",
            "Conversation.PriorityChanged",
            "Conversation.Offered",
            "Conversation.OfferLapsed",
            "Conversation.SlaWarned",
            "Conversation.SlaBreached",
            "Customer.Forgotten",
        }
    )

    def tables(self, generation: int) -> list[str]:
        return [table(ENTRIES, generation)]

    def create_tables(self, tx: Tx, generation: int) -> None:
        (entries,) = self.tables(generation)
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {entries} (conversation_id TEXT NOT NULL, "
            "version INTEGER NOT NULL, notification_id BIGINT NOT NULL, event TEXT NOT NULL, "
            "kind TEXT NOT NULL, direction TEXT, channel TEXT, at TEXT NOT NULL, text TEXT, "
            "source_event_id TEXT, actor TEXT, data TEXT NOT NULL, "
            "PRIMARY KEY (conversation_id, version))" + ("" if tx.is_postgres else " WITHOUT ROWID")
        )

    def create_indexes(self, tx: Tx, generation: int) -> None:
        """The primary key is the only index reads need."""

    def committed(self, generation: int, position: int) -> None:
        """Nothing kept in memory."""

    def forget(self) -> None:
        """Nothing kept in memory."""

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        rows: list[tuple[Any, ...]] = []
        dumps = orjson.dumps
        (entries,) = self.tables(generation)
        for e in events:
            s = e.state
            if e.name == "Customer.Forgotten":
                self._insert(tx, entries, rows)
                rows = []
                _forget(tx, entries, s["conversations"])
                continue
            short = e.name.partition(".")[2]
            kind, direction, data = entry_for(short, s)
            rows.append(
                (
                    e.originator_id,
                    e.version,
                    e.notification_id,
                    short,
                    kind,
                    direction,
                    s.get("channel"),
                    s["at"],
                    s.get("text"),
                    s.get("source_event_id"),
                    s.get("actor"),
                    dumps(data).decode(),
                )
            )
        self._insert(tx, entries, rows)

    @staticmethod
    def _insert(tx: Tx, entries: str, rows: list[tuple[Any, ...]]) -> None:
        tx.insert_many(entries, _COLUMNS, rows)


# What an erasure (`inbox forget`) blanks in entries already written.
_PERSONAL = ("subject", "html", "comment", "error", "name", "number", "thread_ref")


def _forget(tx: Tx, entries: str, conversations: Sequence[str]) -> None:
    for conversation_id in conversations:
        tx.execute(
            f"SELECT version, data FROM {entries} WHERE conversation_id=?", (conversation_id,)
        )
        for version, raw in tx.fetchall():
            data = orjson.loads(raw)
            for name in _PERSONAL:
                if isinstance(data.get(name), str) and data[name]:
                    data[name] = "[forgotten]"
            if data.get("attachments"):
                # (before attachments were checked to be objects, anything was taken in)
                data["attachments"] = [
                    {**a, "name": "[forgotten]", "ref": None}
                    if isinstance(a, dict)
                    else "[forgotten]"
                    for a in data["attachments"]
                ]
            if "in_reply_to" in data:
                data["in_reply_to"] = []
            tx.execute(
                f"UPDATE {entries} SET data=?, text=CASE WHEN text IS NULL OR text='' THEN text "
                "ELSE '[forgotten]' END WHERE conversation_id=? AND version=?",
                (orjson.dumps(data).decode(), conversation_id, version),
            )


def timeline_of(tx: Tx, conversation_id: str) -> list[dict[str, Any]]:
    entries = active_table(tx, NAME, ENTRIES)
    if entries is None:
        return []
    tx.execute(
        "SELECT version, event, kind, direction, channel, at, text, source_event_id, actor, "
        f"data FROM {entries} WHERE conversation_id=? ORDER BY version",
        (conversation_id,),
    )
    return [
        {
            "version": version,
            "event": event,
            "kind": kind,
            "direction": direction,
            "channel": channel,
            "at": at,
            "text": text,
            "source_event_id": source_event_id,
            "actor": actor,
            "data": orjson.loads(data),
        }
        for (
            version,
            event,
            kind,
            direction,
            channel,
            at,
            text,
            source_event_id,
            actor,
            data,
        ) in tx.fetchall()
    ]


def get_conversation(db: ReadModelDB, conversation_id: str) -> dict[str, Any] | None:
    """The inbox-view item of a conversation with its `timeline` (entries in order) and
    `previous` (the customer's conversations opened before it, newest first); None when
    unknown."""
    with db.read() as tx:
        item = get_item(tx, conversation_id)
        if item is None:
            return None
        item["timeline"] = timeline_of(tx, conversation_id)
        opened = (item["opened_at"], conversation_id)
        item["previous"] = [
            c
            for c in conversations_of(tx, item["customer"]["id"])
            if (c["opened_at"], c["id"]) < opened
        ]
    return item
