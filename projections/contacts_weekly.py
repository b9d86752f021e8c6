"""Contacts per customer per week: the example report of docs/new-report.md.

A report nobody thought of when the events were recorded, built from the whole history by
`inbox replay contacts_weekly --from-start`. A contact is what the customer started: a
message (not an auto-reply), a call or a chat; the week is the ISO week of its `at` (UTC).

Tables (generation N): `contacts_weekly_gN` (customer_id, week, contacts) and
`contacts_weekly_owners_gN` (conversation_id -> customer_id, learnt from `Opened`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from projections.base import Event, table
from projections.db import ReadModelDB, Tx
from projections.tracking import active_table

NAME = "contacts_weekly"
COUNTS = "contacts_weekly"
OWNERS = "contacts_weekly_owners"
_STARTED_BY_CUSTOMER = frozenset({"call.started", "chat.started"})


def iso_week(at: str) -> str:
    """`2026-11-27T10:00:00Z` -> `2026-W48`."""
    year, week, _ = datetime.fromisoformat(at.replace("Z", "+00:00")).isocalendar()
    return f"{year}-W{week:02d}"


def _started_by_customer(e: Event) -> bool:
    if e.name == "Conversation.MessageReceived":
        return not e.state["automatic"]
    return e.name == "Conversation.ActivityRecorded" and e.state["activity"] in (
        _STARTED_BY_CUSTOMER
    )


class ContactsWeekly:
    name = NAME
    handles = frozenset(
        {"Conversation.Opened", "Conversation.MessageReceived", "Conversation.ActivityRecorded"}
    )

    def tables(self, generation: int) -> list[str]:
        return [table(COUNTS, generation), table(OWNERS, generation)]

    def create_tables(self, tx: Tx, generation: int) -> None:
        counts, owners = self.tables(generation)
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {counts} (customer_id TEXT NOT NULL, week TEXT NOT NULL, "
            "contacts INTEGER NOT NULL, PRIMARY KEY (customer_id, week))"
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {owners} (conversation_id TEXT PRIMARY KEY, "
            "customer_id TEXT NOT NULL)"
        )

    def create_indexes(self, tx: Tx, generation: int) -> None:
        counts, _ = self.tables(generation)
        tx.execute(f"CREATE INDEX IF NOT EXISTS {counts}_week ON {counts} (week)")

    def committed(self, generation: int, position: int) -> None:
        """Nothing kept in memory."""

    def forget(self) -> None:
        """Nothing kept in memory."""

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        counts, owners = self.tables(generation)
        opened: dict[str, str] = {}
        contacts: list[tuple[str, str]] = []  # (conversation, week)
        for e in events:
            s = e.state
            if e.name == "Conversation.Opened":
                opened[e.originator_id] = s["customer_id"]
            elif _started_by_customer(e):
                contacts.append((e.originator_id, iso_week(s["at"])))
        tx.insert_many(
            owners,
            ("conversation_id", "customer_id"),
            list(opened.items()),
            "ON CONFLICT (conversation_id) DO NOTHING",
        )
        owner_of = dict(opened)
        unknown = sorted({c for c, _ in contacts if c not in owner_of})
        for start in range(0, len(unknown), 500):
            chunk = unknown[start : start + 500]
            tx.execute(
                f"SELECT conversation_id, customer_id FROM {owners} "
                f"WHERE conversation_id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            owner_of.update(tx.fetchall())
        tally = Counter((owner_of[c], week) for c, week in contacts if c in owner_of)
        tx.insert_many(
            counts,
            ("customer_id", "week", "contacts"),
            [(customer, week, n) for (customer, week), n in sorted(tally.items())],
            f"ON CONFLICT (customer_id, week) DO UPDATE SET contacts = "
            f"{counts}.contacts + excluded.contacts",
        )


def contacts_per_week(
    db: ReadModelDB, *, customer: str | None = None, week: str | None = None
) -> list[dict[str, Any]]:
    """Rows `{customer, week, contacts}`, by week then most contacts first."""
    with db.read() as tx:
        counts = active_table(tx, NAME, COUNTS)
        if counts is None:
            return []
        where, params = [], []
        if customer is not None:
            where.append("customer_id=?")
            params.append(customer)
        if week is not None:
            where.append("week=?")
            params.append(week)
        sql = f"SELECT customer_id, week, contacts FROM {counts}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        tx.execute(sql + " ORDER BY week, contacts DESC, customer_id", params)
        return [{"customer": c, "week": w, "contacts": n} for c, w, n in tx.fetchall()]
