"""Escalation queues: conversations a supervisor should look at, each with why and since when.

Six queues (rules in docs/escalations.md): `escalated`, `sla_breach`, `vip`,
`repeat_contact`, `low_csat`, `supervisor_requested`. One item per (queue, conversation).

Tables (generation N):
- `escalation_items_gN`: one row per item: `queue`, `conversation_id`, `customer_id`,
  `reason`, `since`, and the conversation's routing `routing_queue`, `assignee`, `priority`,
  kept current so a supervisor sees who has it;
- `escalation_conversations_gN`: what the rules need of each conversation (owner, resolved,
  routing, whether a low CSAT has been followed up);
- `escalation_customers_gN`: the VIP flag of customers that ever had one;
- `escalation_contacts_gN`: per customer, the inbound contacts of the last 24 hours (before
  its newest one), the only memory the repeat-contact rule needs. Kept in a table, so a
  restart or a second runner needs nothing rebuilt.

A batch is applied in memory: the rows it touches are read once, every event changes them in
log order, the changed ones are written once. What was read stays in memory for the next
batch while nobody else writes the generation (as the inbox view's rows do).
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from inbox.domain.time import parse_iso
from projections.base import Event, Kept, table
from projections.db import ReadModelDB, Tx, replace_on_conflict
from projections.inbox_view import QueryError
from projections.tracking import STATE_TABLE, active_generation

NAME = "escalations"
ITEMS = "escalation_items"
CONVERSATIONS = "escalation_conversations"
CUSTOMERS = "escalation_customers"
CONTACTS = "escalation_contacts"

ESCALATED = "escalated"
SLA_BREACH = "sla_breach"
VIP = "vip"
REPEAT_CONTACT = "repeat_contact"
LOW_CSAT = "low_csat"
SUPERVISOR_REQUESTED = "supervisor_requested"
QUEUES = (ESCALATED, SLA_BREACH, VIP, REPEAT_CONTACT, LOW_CSAT, SUPERVISOR_REQUESTED)

WINDOW = timedelta(hours=24)
REPEAT_THRESHOLD = 3
LOW_CSAT_MAX = 2
CONTACT_ACTIVITIES = frozenset({"call.started", "chat.started"})
MAX_LIMIT = 500
_CHUNK = 500

_ITEM_COLUMNS = (
    "conversation_id",
    "queue",
    "customer_id",
    "reason",
    "since",
    "routing_queue",
    "assignee",
    "priority",
)
_CONV_COLUMNS = (
    "id",
    "customer_id",
    "resolved",
    "routing_queue",
    "assignee",
    "priority",
    "csat_followed",
)
_CONTACT_COLUMNS = ("customer_id", "notification_id", "conversation_id", "at")


# -- the rules that need no database ------------------------------------------------------


class Contact(NamedTuple):
    """One inbound contact of a customer; sorts by time, then log order."""

    at: datetime
    notification_id: int
    conversation_id: str
    at_text: str


def record_contact(window: list[Contact], contact: Contact) -> tuple[int, list[Contact]]:
    """Adds `contact` to a customer's window (sorted) and returns how many contacts fall in
    the 24 hours up to and including its time, itself included, and the contacts it drops:
    those more than 24 h older than the newest, which no later contact can count (a contact
    arriving that late is counted against what is left, then dropped)."""
    insort(window, contact)
    start = contact.at - WINDOW
    count = sum(1 for c in window if start <= c.at <= contact.at)
    cutoff = window[-1].at - WINDOW
    drop = 0
    while drop < len(window) and window[drop].at < cutoff:
        drop += 1
    dropped = window[:drop]
    del window[:drop]
    return count, dropped


def is_contact(event_name: str, state: dict[str, Any]) -> bool:
    """An inbound contact: a message the customer wrote (not an auto-reply or bounce), or a
    call or chat they started."""
    if event_name == "Conversation.MessageReceived":
        return not state.get("automatic", False)
    if event_name == "Conversation.ActivityRecorded":
        return state.get("activity") in CONTACT_ACTIVITIES
    return False


def is_supervisor_request(state: dict[str, Any]) -> bool:
    data = state.get("data") or {}
    return state.get("activity") == "ivr.selected" and data.get("action") == "supervisor"


def sla_reason(kind: str, due_at: str) -> str:
    return f"{kind} breached (due {due_at})"


def repeat_reason(count: int) -> str:
    return f"{count} contacts in 24 h"


def csat_reason(score: int) -> str:
    return f"CSAT {score}/5"


VIP_REASON = "VIP customer"
SUPERVISOR_REASON = "asked the IVR for a supervisor"


# -- in-memory state of one batch ---------------------------------------------------------


@dataclass
class _Item:
    reason: str
    since: str


@dataclass
class _Conv:
    owner: str
    resolved: bool = False
    routing_queue: str | None = None
    assignee: str | None = None
    priority: int = 0
    # A low CSAT is followed up once the conversation has been open after it and is then
    # resolved: True once it has been open.
    csat_followed: bool = False
    items: dict[str, _Item] = field(default_factory=dict)
    # What the tables hold of it, so that rows a batch leaves as they were are not written
    # again (most contacts change nothing here).
    stored_row: tuple[Any, ...] | None = None
    stored_items: tuple[tuple[Any, ...], ...] = ()

    def row(self, conv_id: str) -> tuple[Any, ...]:
        return (
            conv_id,
            self.owner,
            int(self.resolved),
            self.routing_queue,
            self.assignee,
            self.priority,
            int(self.csat_followed),
        )

    def item_rows(self, conv_id: str) -> tuple[tuple[Any, ...], ...]:
        return tuple(
            (
                conv_id,
                queue,
                self.owner,
                item.reason,
                item.since,
                self.routing_queue,
                self.assignee,
                self.priority,
            )
            for queue, item in sorted(self.items.items())
        )

    def enter(self, queue: str, reason: str, since: str) -> None:
        """Enters `queue`, or (already there) takes the newer reason and keeps the oldest
        since."""
        item = self.items.get(queue)
        if item is None:
            self.items[queue] = _Item(reason, since)
        else:
            item.reason = reason


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class _State:
    """The rows held in memory as of `position` of `generation`: valid while nobody else
    writes it, which the conditional position update tells (its position is then still
    ours)."""

    def __init__(self, generation: int, position: int) -> None:
        self.generation = generation
        self.position = position
        self.convs: dict[str, _Conv] = {}
        # customer -> its conversations held here (a VIP change visits them)
        self.owned: dict[str, set[str]] = {}
        # customers whose VIP flag and contact window are held
        self.customers: set[str] = set()
        self.vips: dict[str, bool] = {}
        self.windows: dict[str, list[Contact]] = {}

    def size(self) -> int:
        return len(self.convs) + len(self.customers)


class _Batch:
    def __init__(self, tx: Tx, tables: list[str], state: _State) -> None:
        self.tx = tx
        self.items_table, self.conv_table, self.cust_table, self.contact_table = tables
        self.convs = state.convs
        self.owned = state.owned
        self.customers = state.customers
        self.vips = state.vips
        self.windows = state.windows
        self.dirty_convs: set[str] = set()
        self.dirty_custs: set[str] = set()
        # The contact table's changes: rows to delete (customer, notification id), then rows
        # to insert (customer -> notification id -> contact).
        self.gone: list[tuple[str, int]] = []
        self.new_contacts: dict[str, dict[int, Contact]] = {}
        self.handlers: dict[str, Callable[[Event], None]] = {
            "Conversation.Opened": self.opened,
            "Conversation.MessageReceived": self.contact,
            "Conversation.ActivityRecorded": self.activity,
            "Conversation.Escalated": self.escalated,
            "Conversation.SlaBreached": self.sla_breached,
            "Conversation.CsatSubmitted": self.csat,
            "Conversation.Resolved": self.resolved,
            "Conversation.Reopened": self.reopened,
            "Conversation.Queued": self.queued,
            "Conversation.Transferred": self.transferred,
            "Conversation.Assigned": self.assigned,
            "Conversation.PriorityChanged": self.priority_changed,
            "Customer.VipChanged": self.vip_changed,
            "Customer.Merged": self.merged,
            "Customer.MergeUndone": self.merge_undone,
        }

    # -- loading ------------------------------------------------------------------------

    def load(self, events: Sequence[Event]) -> None:
        conv_ids: set[str] = set()
        cust_ids: set[str] = set()
        vip_changes: set[str] = set()
        for e in events:
            if e.name.startswith("Conversation."):
                conv_ids.add(e.originator_id)
                if e.name == "Conversation.Opened":
                    cust_ids.add(e.state["customer_id"])
            else:
                cust_ids.add(e.originator_id)
                if e.name == "Customer.VipChanged":
                    vip_changes.add(e.originator_id)
                else:  # Merged, MergeUndone
                    cust_ids.add(e.state["other"])
                    conv_ids.update(e.state["conversations"])
        self._load_convs(sorted(conv_ids - self.convs.keys()), "id")
        # Open conversations a VIP change may move in or out of the queue (their owner is
        # the customer, already in `cust_ids`).
        self._load_convs(sorted(vip_changes), "customer_id", open_only=True)
        convs = self.convs
        cust_ids.update(convs[c].owner for c in conv_ids if c in convs)
        self._load_customers(sorted(cust_ids - self.customers))

    def _load_convs(self, keys: Sequence[str], column: str, *, open_only: bool = False) -> None:
        loaded: list[str] = []
        for chunk in _chunks(keys):
            sql = (
                f"SELECT {', '.join(_CONV_COLUMNS)} FROM {self.conv_table} "
                f"WHERE {column} IN ({_marks(len(chunk))})"
            )
            if open_only:
                sql += " AND resolved=0"
            for conv_id, owner, resolved, queue, assignee, priority, followed in self.tx.execute(
                sql, chunk
            ).fetchall():
                if conv_id not in self.convs:
                    conv = _Conv(
                        owner, bool(resolved), queue, assignee, int(priority), bool(followed)
                    )
                    conv.stored_row = conv.row(conv_id)
                    self._hold(conv_id, conv)
                    loaded.append(conv_id)
        for chunk in _chunks(loaded):
            for conv_id, queue, reason, since in self.tx.execute(
                f"SELECT conversation_id, queue, reason, since FROM {self.items_table} "
                f"WHERE conversation_id IN ({_marks(len(chunk))})",
                chunk,
            ).fetchall():
                self.convs[conv_id].items[queue] = _Item(reason, since)
        for conv_id in loaded:
            conv = self.convs[conv_id]
            conv.stored_items = conv.item_rows(conv_id)

    def _load_customers(self, cust_ids: Sequence[str]) -> None:
        self.customers.update(cust_ids)
        for chunk in _chunks(cust_ids):
            marks = _marks(len(chunk))
            for cust_id, vip in self.tx.execute(
                f"SELECT id, vip FROM {self.cust_table} WHERE id IN ({marks})", chunk
            ).fetchall():
                self.vips[cust_id] = bool(vip)
            for cust_id, nid, conv_id, at in self.tx.execute(
                f"SELECT {', '.join(_CONTACT_COLUMNS)} FROM {self.contact_table} "
                f"WHERE customer_id IN ({marks})",
                chunk,
            ).fetchall():
                self._window(cust_id).append(Contact(parse_iso(at), int(nid), conv_id, at))
        for cust_id in cust_ids:
            self.windows.get(cust_id, []).sort()

    def _hold(self, conv_id: str, conv: _Conv) -> None:
        self.convs[conv_id] = conv
        self.owned.setdefault(conv.owner, set()).add(conv_id)

    def _window(self, customer_id: str) -> list[Contact]:
        window = self.windows.get(customer_id)
        if window is None:
            window = self.windows[customer_id] = []
        return window

    # -- applying -----------------------------------------------------------------------

    def run(self, events: Sequence[Event]) -> None:
        self.load(events)
        handlers = self.handlers
        for e in events:
            handler = handlers.get(e.name)
            if handler is not None:
                handler(e)
        self.write()

    def _conv(self, e: Event) -> _Conv | None:
        conv = self.convs.get(e.originator_id)
        if conv is not None:
            self.dirty_convs.add(e.originator_id)
        return conv

    def _enter_open(self, e: Event, queue: str, reason: str) -> None:
        """Enters a queue that only conversations not resolved wait in."""
        conv = self._conv(e)
        if conv is not None and not conv.resolved:
            conv.enter(queue, reason, e.state["at"])

    def opened(self, e: Event) -> None:
        s = e.state
        if e.originator_id in self.convs:
            return
        conv = _Conv(owner=s["customer_id"], routing_queue=s.get("queue"))
        if self.vips.get(conv.owner, False):
            conv.enter(VIP, VIP_REASON, s["at"])
        self._hold(e.originator_id, conv)
        self.dirty_convs.add(e.originator_id)

    def contact(self, e: Event) -> None:
        if not is_contact(e.name, e.state):
            return
        conv = self.convs.get(e.originator_id)
        if conv is None:
            return
        at = e.state["at"]
        new = Contact(parse_iso(at), e.notification_id, e.originator_id, at)
        count, dropped = record_contact(self._window(conv.owner), new)
        self._stored(conv.owner, [new], True)
        self._stored(conv.owner, dropped, False)
        if count >= REPEAT_THRESHOLD:
            self._enter_open(e, REPEAT_CONTACT, repeat_reason(count))

    def _stored(self, customer_id: str, contacts: Iterable[Contact], stored: bool) -> None:
        """Notes contacts that join (`stored`) or leave a customer's rows in the table."""
        new = self.new_contacts.setdefault(customer_id, {})
        for c in contacts:
            if stored:
                new[c.notification_id] = c
            elif new.pop(c.notification_id, None) is None:  # stored by an earlier batch
                self.gone.append((customer_id, c.notification_id))

    def activity(self, e: Event) -> None:
        if is_supervisor_request(e.state):
            self._enter_open(e, SUPERVISOR_REQUESTED, SUPERVISOR_REASON)
        else:
            self.contact(e)

    def escalated(self, e: Event) -> None:
        self._enter_open(e, ESCALATED, e.state["reason"])

    def sla_breached(self, e: Event) -> None:
        self._enter_open(e, SLA_BREACH, sla_reason(e.state["kind"], e.state["due_at"]))

    def csat(self, e: Event) -> None:
        score = int(e.state["score"])
        conv = self._conv(e)
        if conv is None or score > LOW_CSAT_MAX:
            return
        # Survey answers come after the resolution: this queue takes resolved conversations.
        conv.enter(LOW_CSAT, csat_reason(score), e.state["at"])
        conv.csat_followed = not conv.resolved

    def resolved(self, e: Event) -> None:
        conv = self._conv(e)
        if conv is None:
            return
        conv.resolved = True
        low_csat = conv.items.get(LOW_CSAT)
        conv.items.clear()
        if low_csat is not None and not conv.csat_followed:
            conv.items[LOW_CSAT] = low_csat
        conv.csat_followed = False

    def reopened(self, e: Event) -> None:
        conv = self._conv(e)
        if conv is not None:
            conv.resolved = False
            conv.csat_followed = LOW_CSAT in conv.items

    def queued(self, e: Event) -> None:
        conv = self._conv(e)
        if conv is not None:
            conv.routing_queue = e.state["queue"]
            conv.priority = int(e.state["priority"])

    def transferred(self, e: Event) -> None:
        conv = self._conv(e)
        if conv is not None:
            conv.routing_queue = e.state["queue"]
            conv.assignee = None

    def assigned(self, e: Event) -> None:
        conv = self._conv(e)
        if conv is not None:
            conv.assignee = e.state["agent"]

    def priority_changed(self, e: Event) -> None:
        conv = self._conv(e)
        if conv is not None:
            conv.priority = int(e.state["priority"])

    # -- customers ----------------------------------------------------------------------

    def _place_vip(self, conv_id: str, conv: _Conv, at: str) -> None:
        """Puts an open conversation in or out of the VIP queue after its owner changed."""
        if self.vips.get(conv.owner, False) and not conv.resolved:
            if VIP not in conv.items:
                conv.items[VIP] = _Item(VIP_REASON, at)
                self.dirty_convs.add(conv_id)
        elif VIP in conv.items and not conv.resolved:
            del conv.items[VIP]
            self.dirty_convs.add(conv_id)

    def vip_changed(self, e: Event) -> None:
        customer = e.originator_id
        self.vips[customer] = bool(e.state["vip"])
        self.dirty_custs.add(customer)
        for conv_id in sorted(self.owned.get(customer, ())):
            self._place_vip(conv_id, self.convs[conv_id], e.state["at"])

    def _move(self, conversation_ids: Iterable[str], source: str, target: str, at: str) -> None:
        """Conversations (and their recent contacts) now show under `target`."""
        moving = set(conversation_ids)
        for conv_id in sorted(moving):
            conv = self.convs.get(conv_id)
            if conv is None:
                continue
            self.owned[conv.owner].discard(conv_id)
            conv.owner = target
            self.owned.setdefault(target, set()).add(conv_id)
            self.dirty_convs.add(conv_id)
            self._place_vip(conv_id, conv, at)
        window = self._window(source)
        moved = [c for c in window if c.conversation_id in moving]
        if moved:
            window[:] = [c for c in window if c.conversation_id not in moving]
            target_window = self._window(target)
            target_window.extend(moved)
            target_window.sort()
            self._stored(source, moved, False)
            self._stored(target, moved, True)

    def merged(self, e: Event) -> None:
        s = e.state
        self._move(s["conversations"], s["other"], e.originator_id, s["at"])

    def merge_undone(self, e: Event) -> None:
        s = e.state
        self._move(s["conversations"], e.originator_id, s["other"], s["at"])

    # -- writing ------------------------------------------------------------------------

    def write(self) -> None:
        tx = self.tx
        conv_rows: list[tuple[Any, ...]] = []
        cleared: list[str] = []  # conversations whose items are written again
        item_rows: list[tuple[Any, ...]] = []
        for conv_id in sorted(self.dirty_convs):
            c = self.convs[conv_id]
            row = c.row(conv_id)
            if row != c.stored_row:
                conv_rows.append(row)
                c.stored_row = row
            items = c.item_rows(conv_id)
            if items != c.stored_items:
                if c.stored_items:
                    cleared.append(conv_id)
                item_rows.extend(items)
                c.stored_items = items
        for chunk in _chunks(cleared):
            tx.execute(
                f"DELETE FROM {self.items_table} WHERE conversation_id IN ({_marks(len(chunk))})",
                chunk,
            )
        tx.insert_many(
            self.conv_table, _CONV_COLUMNS, conv_rows, replace_on_conflict("id", _CONV_COLUMNS)
        )
        tx.insert_many(self.items_table, _ITEM_COLUMNS, item_rows)
        tx.insert_many(
            self.cust_table,
            ("id", "vip"),
            [(c, int(self.vips[c])) for c in sorted(self.dirty_custs)],
            replace_on_conflict("id", ("vip",)),
        )
        # Deletes first: a contact that left a customer and came back is deleted, then
        # inserted again.
        tx.executemany(
            f"DELETE FROM {self.contact_table} WHERE customer_id=? AND notification_id=?",
            sorted(self.gone),
        )
        tx.insert_many(
            self.contact_table,
            _CONTACT_COLUMNS,
            [
                (cust, c.notification_id, c.conversation_id, c.at_text)
                for cust, contacts in sorted(self.new_contacts.items())
                for c in contacts.values()
            ],
        )


class Escalations:
    """The projection (see the module doc)."""

    name = NAME
    handles = frozenset(
        {
            "Conversation.Opened",
            "Conversation.MessageReceived",
            "Conversation.ActivityRecorded",
            "Conversation.Escalated",
            "Conversation.SlaBreached",
            "Conversation.CsatSubmitted",
            "Conversation.Resolved",
            "Conversation.Reopened",
            "Conversation.Queued",
            "Conversation.Transferred",
            "Conversation.Assigned",
            "Conversation.PriorityChanged",
            "Customer.VipChanged",
            "Customer.Merged",
            "Customer.MergeUndone",
        }
    )

    def tables(self, generation: int) -> list[str]:
        return [table(t, generation) for t in (ITEMS, CONVERSATIONS, CUSTOMERS, CONTACTS)]

    def create_tables(self, tx: Tx, generation: int) -> None:
        items, convs, custs, contacts = self.tables(generation)
        clustered = "" if tx.is_postgres else " WITHOUT ROWID"
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {items} (conversation_id TEXT NOT NULL, "
            "queue TEXT NOT NULL, customer_id TEXT NOT NULL, reason TEXT NOT NULL, "
            "since TEXT NOT NULL, routing_queue TEXT, assignee TEXT, priority INTEGER NOT NULL, "
            "PRIMARY KEY (conversation_id, queue))" + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {convs} (id TEXT PRIMARY KEY, "
            "customer_id TEXT NOT NULL, resolved INTEGER NOT NULL, routing_queue TEXT, "
            "assignee TEXT, priority INTEGER NOT NULL, csat_followed INTEGER NOT NULL)" + clustered
        )
        # Applying a VIP change looks up the customer's open conversations: needed while
        # a rebuild runs, so it is not left to create_indexes.
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {convs}_customer ON {convs} (customer_id, resolved)"
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {custs} (id TEXT PRIMARY KEY, vip INTEGER NOT NULL)"
            + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {contacts} (customer_id TEXT NOT NULL, "
            "notification_id BIGINT NOT NULL, conversation_id TEXT NOT NULL, at TEXT NOT NULL, "
            "PRIMARY KEY (customer_id, notification_id))" + clustered
        )

    def create_indexes(self, tx: Tx, generation: int) -> None:
        items = self.tables(generation)[0]
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {items}_queue ON {items} (queue, since, conversation_id)"
        )

    def __init__(self, cache_limit: int = 500_000) -> None:
        """`cache_limit`: conversations and customers held between batches at most."""
        self.kept: Kept[_State] = Kept(cache_limit)

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        state = self.kept.take(generation, position, lambda: _State(generation, position))
        _Batch(tx, self.tables(generation), state).run(events)

    def committed(self, generation: int, position: int) -> None:
        self.kept.committed(generation, position)

    def forget(self) -> None:
        self.kept.forget()


def escalation_queues(db: ReadModelDB, *, limit: int = 500) -> list[dict[str, Any]]:
    """Every escalation queue, in a fixed order, with up to `limit` items each, oldest first:
    `[{"name", "items": [{"conversation", "customer", "reason", "since", "queue", "assignee",
    "priority"}, ...]}, ...]`. Raises QueryError when `limit` is not from 1 to 500."""
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be from 1 to {MAX_LIMIT}")
    result: list[dict[str, Any]] = [{"name": q, "items": []} for q in QUEUES]
    if not db.table_exists(STATE_TABLE):  # no projection ever ran on this database
        return result
    with db.read() as tx:
        state = active_generation(tx, NAME)
        if state is None:
            return result
        items = table(ITEMS, state.generation)
        for queue in result:
            rows = tx.execute(
                "SELECT conversation_id, customer_id, reason, since, routing_queue, assignee, "
                f"priority FROM {items} WHERE queue=? ORDER BY since, conversation_id LIMIT ?",
                (queue["name"], limit),
            ).fetchall()
            queue["items"] = [
                {
                    "conversation": conv_id,
                    "customer": customer,
                    "reason": reason,
                    "since": since,
                    "queue": routing_queue,
                    "assignee": assignee,
                    "priority": priority,
                }
                for conv_id, customer, reason, since, routing_queue, assignee, priority in rows
            ]
    return result
