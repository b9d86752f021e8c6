"""Pure parts of the projections: timeline entry mapping, cursors, topics, placeholders."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from projections.db import to_psycopg
from projections.inbox_view import QueryError, decode_cursor, encode_cursor
from projections.runner import decode, event_name
from projections.timeline import entry_for


@pytest.mark.parametrize(
    ("event", "state", "kind", "direction"),
    [
        ("MessageReceived", {"channel": "email", "text": "hi"}, "message", "in"),
        ("ReplyQueued", {"channel": "sms", "text": "ok", "actor": "a"}, "message", "out"),
        ("ActivityRecorded", {"activity": "call.started", "data": {}}, "call", "in"),
        ("ActivityRecorded", {"activity": "call.abandoned", "data": {}}, "call", "in"),
        (
            "ActivityRecorded",
            {"activity": "call.answered", "data": {"direction": "outbound", "callback_id": "c"}},
            "call",
            "out",
        ),
        ("ActivityRecorded", {"activity": "ivr.selected", "data": {}}, "ivr", "in"),
        ("ActivityRecorded", {"activity": "callback.requested", "data": {}}, "callback", "in"),
        ("ActivityRecorded", {"activity": "chat.started", "data": {}}, "status", None),
        ("NoteAdded", {"text": "n", "actor": "a"}, "note", None),
        ("DeliveryStatusRecorded", {"status": "read"}, "delivery", "out"),
        ("CsatSubmitted", {"score": 4}, "csat", "in"),
        ("Opened", {"channel": "email"}, "status", None),
        ("Assigned", {"agent": "ann"}, "status", None),
        ("Transferred", {"queue": "q"}, "status", None),
        ("Escalated", {"reason": "r"}, "status", None),
        ("MarkedPending", {}, "status", None),
        ("Resolved", {}, "status", None),
        ("Reopened", {"reason": "r"}, "status", None),
    ],
)
def test_timeline_entry_kinds(
    event: str, state: dict[str, Any], kind: str, direction: str | None
) -> None:
    assert entry_for(event, {"at": "t", **state})[:2] == (kind, direction)


def test_timeline_entry_data_keeps_the_extra_fields_only() -> None:
    _, _, data = entry_for(
        "ActivityRecorded",
        {
            "timestamp": "x",
            "activity": "ivr.selected",
            "channel": "voice",
            "data": {"call_sid": "CA1", "choice": "2"},
            "source_event_id": "e1",
            "at": "t",
        },
    )
    assert data == {"call_sid": "CA1", "choice": "2", "activity": "ivr.selected"}
    _, _, status = entry_for("Assigned", {"agent": "ann", "actor": "sup", "at": "t"})
    assert status == {"agent": "ann", "change": "Assigned"}


def test_cursor_round_trip_and_rejects() -> None:
    cursor = encode_cursor("2026-01-01T00:00:00.000000Z", "abc")
    assert decode_cursor(cursor) == ("2026-01-01T00:00:00.000000Z", "abc")
    for bad in ("%%%", "bm90IGpzb24=", encode_cursor("a", "b")[:-4], "WzEsMl0="):
        with pytest.raises(QueryError):
            decode_cursor(bad)


def test_event_names_and_decode_skips_what_is_not_handled() -> None:
    assert event_name("inbox.domain.conversation:Conversation.Opened") == "Conversation.Opened"
    hexid = "29426ce81b935cecb6183b95b91c8313"
    records = [
        (1, "inbox.domain.customer:Customer.Registered", hexid, 1, orjson.dumps({"a": 1})),
        (2, "inbox.domain.customer:Customer.ConversationStarted", hexid, 2, b"not json"),
    ]
    (event,) = decode(records, frozenset({"Customer.Registered"}))
    assert event.notification_id == 1
    assert event.originator_id == "29426ce8-1b93-5cec-b618-3b95b91c8313"
    assert event.state == {"a": 1}


def test_placeholders_for_psycopg() -> None:
    assert to_psycopg("SELECT * FROM t WHERE a=? AND b LIKE '%x'") == (
        "SELECT * FROM t WHERE a=%s AND b LIKE '%%x'"
    )
