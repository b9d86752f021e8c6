"""The inbox view: one row per conversation, as the agent's list shows it, and the customers.

Tables (generation N):
- `inbox_conversations_gN`: one row per conversation (the CONTRACT list-item fields, plus
  `opened_at`, `updated_at`, `customer_id` = who opened it, `owner_id` = the customer it shows
  under now (differs after a merge), `events` = conversation events applied);
- `inbox_customers_gN`: id, name, identities (JSON list), merged_into;
- `inbox_claims_gN`: identity key -> customer (from IdentityClaim events).

`updated_at` is the latest `at` of the conversation's events except delivery receipts and
survey answers. A batch is applied in memory (rows read once, changed by every event of the
batch, written once with an upsert), which is what lets a replay run at tens of thousands of
events a second.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from inbox.contact import CHANNELS as KNOWN_CHANNELS
from inbox.domain.sla import SlaPolicy, earliest_due, running_clocks
from inbox.domain.time import iso, parse_iso
from inbox.identity import InvalidIdentity, parse_key
from projections.base import Event, Kept, table
from projections.db import ReadModelDB, Tx, replace_on_conflict
from projections.tracking import active_table

NAME = "inbox"
CONVERSATIONS = "inbox_conversations"
CUSTOMERS = "inbox_customers"
CLAIMS = "inbox_claims"
POLICIES = "inbox_sla_policies"

OPEN, PENDING, RESOLVED = "open", "pending", "resolved"
STATUSES = frozenset({OPEN, PENDING, RESOLVED})
DEFAULT_PRIORITY = 0
MAX_LIMIT = 500

_CONV_COLUMNS = (
    "id",
    "customer_id",
    "owner_id",
    "channels",
    "status",
    "assignee",
    "queue",
    "priority",
    "escalated",
    "last_channel",
    "last_text",
    "last_at",
    "last_direction",
    "waiting_since",
    "sla_due_at",
    "opened_at",
    "updated_at",
    "resolved_at",
    "previous_id",
    "events",
    "offered_to",
    "first_response_at",
    "cycle_started_at",
    "position",
)
# Positions in a conversation row (a list, in memory, in `_CONV_COLUMNS` order).
CUSTOMER_ID = 1
OWNER_ID = 2
CHANNELS = 3
STATUS = 4
ASSIGNEE = 5
QUEUE = 6
PRIORITY = 7
ESCALATED = 8
LAST_CHANNEL = 9
LAST_TEXT = 10
LAST_AT = 11
LAST_DIRECTION = 12
WAITING_SINCE = 13
SLA_DUE_AT = 14
OPENED_AT = 15
UPDATED_AT = 16
RESOLVED_AT = 17
PREVIOUS_ID = 18
EVENTS = 19
OFFERED_TO = 20
FIRST_RESPONSE_AT = 21
CYCLE_STARTED_AT = 22
# The notification id of the last event that changed the row: a conversation's page waits
# for the timeline to reach it (inbox/api.py).
POSITION = 23
_CUST_COLUMNS = ("id", "name", "identities", "merged_into", "created_at", "updated_at")
_CLAIM_COLUMNS = ("claim_id", "key", "customer_id")
_CHUNK = 500


class QueryError(ValueError):
    """A filter, limit or cursor the inbox view cannot answer (an HTTP 400)."""


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class InboxView:
    """The projection (see the module doc)."""

    name = NAME
    handles = frozenset(
        {
            "Conversation.Opened",
            "Conversation.MessageReceived",
            "Conversation.ActivityRecorded",
            "Conversation.NoteAdded",
            "Conversation.ReplyQueued",
            "Conversation.Assigned",
            "Conversation.Transferred",
            "Conversation.Escalated",
            "Conversation.MarkedPending",
            "Conversation.Resolved",
            "Conversation.Reopened",
            "Conversation.DeliveryStatusRecorded",
            "Conversation.CsatSubmitted",
            "Conversation.SurveyQueued",
            "Conversation.Queued",
            "Conversation.PriorityChanged",
            "Conversation.Offered",
            "Conversation.OfferLapsed",
            "Queue.Defined",
            "Queue.Changed",
            "Customer.Registered",
            "Customer.IdentityAdded",
            "Customer.NameLearned",
            "Customer.Merged",
            "Customer.MergedInto",
            "Customer.MergeUndone",
            "Customer.Restored",
            "IdentityClaim.Claimed",
            "IdentityClaim.Reassigned",
            "Customer.Forgotten",
        }
    )

    def tables(self, generation: int) -> list[str]:
        return [table(t, generation) for t in (CONVERSATIONS, CUSTOMERS, CLAIMS, POLICIES)]

    def create_tables(self, tx: Tx, generation: int) -> None:
        conv, cust, claims, policies = self.tables(generation)
        # the SLA policy of each queue as of this generation's position (queue ids -> name)
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {policies} (queue_id TEXT PRIMARY KEY, "
            "name TEXT NOT NULL, sla TEXT)"
        )
        # SQLite: the primary key is the table (one B-tree to write instead of two).
        clustered = "" if tx.is_postgres else " WITHOUT ROWID"
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {conv} (id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, "
            "owner_id TEXT NOT NULL, channels TEXT NOT NULL, status TEXT NOT NULL, "
            "assignee TEXT, queue TEXT, priority INTEGER NOT NULL, escalated INTEGER NOT NULL, "
            "last_channel TEXT, last_text TEXT, last_at TEXT, last_direction TEXT, "
            "waiting_since TEXT, sla_due_at TEXT, opened_at TEXT NOT NULL, "
            "updated_at TEXT NOT NULL, resolved_at TEXT, previous_id TEXT, "
            "events INTEGER NOT NULL, offered_to TEXT, first_response_at TEXT, "
            "cycle_started_at TEXT, position BIGINT NOT NULL)" + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {cust} (id TEXT PRIMARY KEY, name TEXT, "
            "identities TEXT NOT NULL, merged_into TEXT, created_at TEXT, updated_at TEXT)"
            + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {claims} (claim_id TEXT PRIMARY KEY, "
            "key TEXT NOT NULL, customer_id TEXT NOT NULL)" + clustered
        )

    def create_indexes(self, tx: Tx, generation: int) -> None:
        conv, _, claims, _ = self.tables(generation)
        tx.execute(f"CREATE INDEX IF NOT EXISTS {conv}_updated ON {conv} (updated_at, id)")
        tx.execute(f"CREATE INDEX IF NOT EXISTS {conv}_status ON {conv} (status, updated_at, id)")
        tx.execute(f"CREATE INDEX IF NOT EXISTS {conv}_owner ON {conv} (owner_id, opened_at)")
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {conv}_queue ON {conv} (queue, status, updated_at, id)"
        )
        # An agent's scope (list_conversations with `scope`): one ordered walk per branch of
        # "assigned to me, offered to me, unassigned in a queue I may take". Partial, so they
        # hold only the rows a branch can match; the trailing assignee (always NULL there)
        # makes the last one covering on SQLite.
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {conv}_assignee ON {conv} "
            "(assignee, status, updated_at, id) WHERE assignee IS NOT NULL"
        )
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {conv}_offered ON {conv} "
            "(offered_to, status, updated_at, id) WHERE offered_to IS NOT NULL"
        )
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {conv}_unassigned ON {conv} "
            "(queue, status, updated_at, id, assignee) WHERE assignee IS NULL"
        )
        # A channel filter: one partial index per channel, so a rare channel's conversations
        # are found without testing every open row (383 ms -> 0.1 ms at 100,000 open).
        for channel in sorted(KNOWN_CHANNELS):
            tx.execute(
                f"CREATE INDEX IF NOT EXISTS {conv}_ch_{channel} ON {conv} "
                f"(status, updated_at, id) WHERE {_has_channel(channel)}"
            )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {claims}_key ON {claims} (key)")

    def __init__(
        self,
        cache_limit: int = 500_000,
        *,
        current_policies: Mapping[str, SlaPolicy] | None = None,
    ) -> None:
        """`current_policies` (queue -> SLA policy): a rebuild that applies today's policies to
        the whole history instead of each policy from its event on (`--current-sla`)."""
        self.current_policies = current_policies
        self.kept: Kept[_Cache] = Kept(cache_limit)

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        cache = self.kept.take(generation, position, lambda: _Cache(generation, position))
        _Batch(tx, self.tables(generation), cache, self.current_policies).run(events)

    def committed(self, generation: int, position: int) -> None:
        self.kept.committed(generation, position)

    def forget(self) -> None:
        self.kept.forget()


class _Cache:
    """Rows as of `position` of `generation`: valid while nobody else writes it, which the
    conditional position update tells (its position is then still ours)."""

    def __init__(self, generation: int, position: int) -> None:
        self.generation = generation
        self.position = position
        self.convs: dict[str, list[Any]] = {}
        self.custs: dict[str, dict[str, Any]] = {}
        self.claims: dict[str, dict[str, Any]] = {}

    def size(self) -> int:
        return len(self.convs) + len(self.custs) + len(self.claims)


class _Batch:
    """One batch applied in memory: rows loaded once (or kept from earlier batches), written
    once."""

    def __init__(
        self,
        tx: Tx,
        tables: list[str],
        cache: _Cache,
        current_policies: Mapping[str, SlaPolicy] | None = None,
    ) -> None:
        self.tx = tx
        self.current_policies = current_policies
        self.conv_table, self.cust_table, self.claim_table, self.policy_table = tables
        self.policies: dict[str, SlaPolicy] | None = None
        self.convs: dict[str, list[Any]] = cache.convs
        self.custs = cache.custs
        self.claims = cache.claims
        self.dirty_convs: set[str] = set()
        self.position = 0  # of the event being applied
        # rows whose sla_due_at is computed since they last changed (see queue_defined)
        self.sla_done: set[str] = set()
        self.dirty_custs: set[str] = set()
        self.dirty_claims: set[str] = set()
        self.handlers: dict[str, Callable[[Event], None]] = {
            "Conversation.Opened": self.opened,
            "Conversation.MessageReceived": self.message_received,
            "Conversation.ActivityRecorded": self.activity_recorded,
            "Conversation.NoteAdded": self.touch_only,
            "Conversation.ReplyQueued": self.reply_queued,
            "Conversation.Assigned": self.assigned,
            "Conversation.Transferred": self.transferred,
            "Conversation.Escalated": self.escalated,
            "Conversation.MarkedPending": self.marked_pending,
            "Conversation.Resolved": self.resolved,
            "Conversation.Reopened": self.reopened,
            "Conversation.DeliveryStatusRecorded": self.follow_up,
            "Conversation.CsatSubmitted": self.follow_up,
            "Conversation.SurveyQueued": self.follow_up,
            "Conversation.Queued": self.queued,
            "Conversation.PriorityChanged": self.priority_changed,
            "Conversation.Offered": self.offered,
            "Conversation.OfferLapsed": self.offer_lapsed,
            "Queue.Defined": self.queue_defined,
            "Queue.Changed": self.queue_defined,
            "Customer.Registered": self.registered,
            "Customer.IdentityAdded": self.identity_added,
            "Customer.NameLearned": self.name_learned,
            "Customer.Merged": self.merged,
            "Customer.MergedInto": self.merged_into,
            "Customer.MergeUndone": self.merge_undone,
            "Customer.Restored": self.restored,
            "IdentityClaim.Claimed": self.claimed,
            "IdentityClaim.Reassigned": self.reassigned,
            "Customer.Forgotten": self.forgotten,
        }

    # -- loading and writing ------------------------------------------------------------

    def run(self, events: Sequence[Event]) -> None:
        self._prefetch(events)
        handlers = self.handlers
        for event in events:
            self.position = event.notification_id
            handlers[event.name](event)
        self._write()

    def _changed(self, conv_id: str, row: list[Any]) -> None:
        row[POSITION] = self.position
        self.dirty_convs.add(conv_id)

    def _prefetch(self, events: Sequence[Event]) -> None:
        """Reads, in a few queries, every existing row the batch will touch."""
        seen: set[str] = set()
        created: set[str] = set()  # first event in this batch: no row to read
        convs: set[str] = set()
        custs: set[str] = set()
        claims: set[str] = set()
        for e in events:
            oid = e.originator_id
            kind = e.name[:3]  # "Con", "Cus", "Ide", "Que"
            if kind == "Que":
                continue
            if oid not in seen:
                seen.add(oid)
                if e.version > 1:
                    (convs if kind == "Con" else custs if kind == "Cus" else claims).add(oid)
                else:
                    created.add(oid)
            if e.name == "Conversation.Opened":
                custs.add(e.state["customer_id"])
            elif e.name in ("Customer.Merged", "Customer.MergeUndone"):
                convs.update(e.state["conversations"])
                custs.add(e.state["other"])
        self._load(self.conv_table, _CONV_COLUMNS, convs - created, self.convs, _conv_from_row)
        self._load(self.cust_table, _CUST_COLUMNS, custs - created, self.custs, _cust_from_row)
        self._load(self.claim_table, _CLAIM_COLUMNS, claims, self.claims, _claim_from_row)

    def _load(
        self,
        name: str,
        columns: Sequence[str],
        ids: set[str],
        into: dict[str, Any],
        convert: Callable[[tuple[Any, ...]], Any],
    ) -> None:
        wanted = sorted(i for i in ids if i not in into)
        cols = ", ".join(columns)
        for chunk in _chunks(wanted):
            marks = ",".join("?" * len(chunk))
            self.tx.execute(f"SELECT {cols} FROM {name} WHERE {columns[0]} IN ({marks})", chunk)
            for row in self.tx.fetchall():
                into[row[0]] = convert(row)

    def _conv(self, conv_id: str) -> list[Any] | None:
        row = self.convs.get(conv_id)
        if row is None:
            self._load(self.conv_table, _CONV_COLUMNS, {conv_id}, self.convs, _conv_from_row)
            row = self.convs.get(conv_id)
        return row

    def _cust(self, cust_id: str) -> dict[str, Any] | None:
        row = self.custs.get(cust_id)
        if row is None:
            self._load(self.cust_table, _CUST_COLUMNS, {cust_id}, self.custs, _cust_from_row)
            row = self.custs.get(cust_id)
        return row

    def _survivor(self, cust_id: str) -> str:
        """The customer that `cust_id` was merged into, following merges to the end."""
        for _ in range(32):
            cust = self._cust(cust_id)
            if cust is None or cust["merged_into"] is None:
                return cust_id
            cust_id = cust["merged_into"]
        return cust_id

    def _sla_policies(self) -> dict[str, SlaPolicy]:
        """Queue name -> SLA policy, as of this batch (read once per batch: a few rows)."""
        if self.current_policies is not None:
            return dict(self.current_policies)
        if self.policies is None:
            self.policies = {}
            self.tx.execute(f"SELECT name, sla FROM {self.policy_table} WHERE sla IS NOT NULL")
            for name, sla in self.tx.fetchall():
                self.policies[name] = SlaPolicy.from_dict({**orjson.loads(sla), "queue": name})
        return self.policies

    def _compute_sla(self) -> None:
        for conv_id in self.dirty_convs - self.sla_done:
            row = self.convs[conv_id]
            row[SLA_DUE_AT] = self._sla_due(row)
        self.sla_done |= self.dirty_convs

    def queue_defined(self, e: Event) -> None:
        """A policy applies from its event on: rows are due again when they next change (so
        what changed before it in this batch is computed with the policy before it)."""
        self._compute_sla()
        s = e.state
        sla = s["spec"].get("sla")
        name = s.get("name")
        if name is None:
            self.tx.execute(
                f"SELECT name FROM {self.policy_table} WHERE queue_id=?", (e.originator_id,)
            )
            found = self.tx.fetchone()
            if found is None:
                return
            name = found[0]
        encoded = None if not sla else orjson.dumps(sla).decode()
        self.tx.execute(
            f"INSERT INTO {self.policy_table} (queue_id, name, sla) VALUES (?, ?, ?) "
            "ON CONFLICT (queue_id) DO UPDATE SET sla=excluded.sla",
            (e.originator_id, name, encoded),
        )
        self.policies = None

    def _sla_due(self, row: list[Any]) -> str | None:
        policy = None if row[QUEUE] is None else self._sla_policies().get(row[QUEUE])
        if policy is None or row[STATUS] == RESOLVED:
            return None
        due = earliest_due(
            running_clocks(
                policy,
                row[PRIORITY],
                opened_at=parse_iso(row[CYCLE_STARTED_AT] or row[OPENED_AT]),
                first_response_at=_when(row[FIRST_RESPONSE_AT]),
                waiting_since=_when(row[WAITING_SINCE]),
                resolved=False,
            )
        )
        return None if due is None else iso(due.due_at)

    def _write(self) -> None:
        tx = self.tx
        dumps = orjson.dumps
        if self.dirty_convs:
            convs = self.convs
            self._compute_sla()
            rows = [convs[conv_id] for conv_id in self.dirty_convs]
            tx.insert_many(
                self.conv_table, _CONV_COLUMNS, rows, replace_on_conflict("id", _CONV_COLUMNS)
            )
        if self.dirty_custs:
            tx.insert_many(
                self.cust_table,
                _CUST_COLUMNS,
                [
                    (
                        cust_id,
                        c["name"],
                        dumps(c["identities"]).decode(),
                        c["merged_into"],
                        c["created_at"],
                        c["updated_at"],
                    )
                    for cust_id in self.dirty_custs
                    for c in (self.custs[cust_id],)
                ],
                replace_on_conflict("id", _CUST_COLUMNS),
            )
        if self.dirty_claims:
            tx.insert_many(
                self.claim_table,
                _CLAIM_COLUMNS,
                [
                    (claim_id, c["key"], c["customer_id"])
                    for claim_id in self.dirty_claims
                    for c in (self.claims[claim_id],)
                ],
                replace_on_conflict("claim_id", _CLAIM_COLUMNS),
            )

    # -- conversation events ------------------------------------------------------------

    def _touch(self, e: Event, *, update: bool = True) -> list[Any] | None:
        row = self.convs.get(e.originator_id) or self._conv(e.originator_id)
        if row is None:
            return None  # an event of a conversation this view never saw open
        at = e.state["at"]
        if update and at > row[UPDATED_AT]:
            row[UPDATED_AT] = at
        row[EVENTS] += 1
        self._changed(e.originator_id, row)
        self.sla_done.discard(e.originator_id)
        return row

    def opened(self, e: Event) -> None:
        s = e.state
        at = s["at"]
        self.convs[e.originator_id] = [
            e.originator_id,
            s["customer_id"],
            self._survivor(s["customer_id"]),
            orjson.dumps([s["channel"]]).decode(),
            OPEN,
            None,  # assignee
            s.get("queue"),
            DEFAULT_PRIORITY,
            0,  # escalated
            None,  # last message: channel, text, at, direction
            None,
            None,
            None,
            None,  # waiting_since
            None,  # sla_due_at
            at,  # opened_at
            at,  # updated_at
            None,  # resolved_at
            s.get("previous"),
            1,  # events
            None,  # offered_to
            None,  # first_response_at
            at,  # cycle_started_at
            e.notification_id,  # position
        ]
        self.dirty_convs.add(e.originator_id)

    @staticmethod
    def _channel(row: list[Any], channel: str) -> None:
        # Channels are a JSON list of plain names: a quoted name is found by substring.
        if f'"{channel}"' not in row[CHANNELS]:
            row[CHANNELS] = orjson.dumps([*orjson.loads(row[CHANNELS]), channel]).decode()

    @staticmethod
    def _inbound(row: list[Any], at: str) -> None:
        if row[STATUS] == PENDING:
            row[STATUS] = OPEN
        if row[WAITING_SINCE] is None:
            row[WAITING_SINCE] = at

    def message_received(self, e: Event) -> None:
        row = self._touch(e)
        if row is None:
            return
        s = e.state
        self._channel(row, s["channel"])
        row[LAST_CHANNEL] = s["channel"]
        row[LAST_TEXT] = s["text"] or s.get("subject") or ""
        row[LAST_AT] = s["at"]
        row[LAST_DIRECTION] = "in"
        if not s["automatic"]:
            self._inbound(row, s["at"])

    def activity_recorded(self, e: Event) -> None:
        row = self._touch(e)
        if row is None:
            return
        s = e.state
        self._channel(row, s["channel"])
        activity = s["activity"]
        if activity in ("call.started", "chat.started"):
            self._inbound(row, s["at"])
        elif activity == "call.answered":
            row[WAITING_SINCE] = None

    def touch_only(self, e: Event) -> None:
        self._touch(e)

    def follow_up(self, e: Event) -> None:
        """A delivery receipt or a survey answer: its channel counts, the time does not (a
        read receipt does not bring a conversation to the top of the inbox)."""
        row = self._touch(e, update=False)
        if row is not None:
            self._channel(row, e.state["channel"])

    def reply_queued(self, e: Event) -> None:
        row = self._touch(e)
        if row is None:
            return
        s = e.state
        self._channel(row, s["channel"])
        row[LAST_CHANNEL] = s["channel"]
        row[LAST_TEXT] = s["text"]
        row[LAST_AT] = s["at"]
        row[LAST_DIRECTION] = "out"
        row[WAITING_SINCE] = None
        if row[FIRST_RESPONSE_AT] is None:
            row[FIRST_RESPONSE_AT] = s["at"]

    def assigned(self, e: Event) -> None:
        row = self._touch(e)
        if row is not None:
            row[ASSIGNEE] = e.state["agent"]
            row[OFFERED_TO] = None

    def transferred(self, e: Event) -> None:
        row = self._touch(e)
        if row is not None:
            row[QUEUE] = e.state["queue"]
            row[ASSIGNEE] = None
            row[OFFERED_TO] = None

    def queued(self, e: Event) -> None:
        row = self._touch(e, update=False)
        if row is not None:
            row[QUEUE] = e.state["queue"]
            row[PRIORITY] = e.state["priority"]

    def priority_changed(self, e: Event) -> None:
        row = self._touch(e, update=False)
        if row is not None:
            row[PRIORITY] = e.state["priority"]

    def offered(self, e: Event) -> None:
        row = self._touch(e, update=False)
        if row is not None:
            row[OFFERED_TO] = e.state["agent"]

    def offer_lapsed(self, e: Event) -> None:
        row = self._touch(e, update=False)
        if row is not None:
            row[OFFERED_TO] = None

    def escalated(self, e: Event) -> None:
        row = self._touch(e)
        if row is not None:
            row[ESCALATED] = 1

    def marked_pending(self, e: Event) -> None:
        row = self._touch(e)
        if row is not None:
            row[STATUS] = PENDING

    def resolved(self, e: Event) -> None:
        row = self._touch(e)
        if row is not None:
            row[STATUS] = RESOLVED
            row[RESOLVED_AT] = e.state["at"]
            row[WAITING_SINCE] = None
            row[OFFERED_TO] = None

    def reopened(self, e: Event) -> None:
        row = self._touch(e)
        if row is not None:
            row[STATUS] = OPEN
            row[RESOLVED_AT] = None
            row[CYCLE_STARTED_AT] = e.state["at"]
            row[FIRST_RESPONSE_AT] = None

    # -- customers ----------------------------------------------------------------------

    def _customer_event(self, e: Event) -> dict[str, Any] | None:
        cust = self.custs.get(e.originator_id) or self._cust(e.originator_id)
        if cust is not None:
            cust["updated_at"] = e.state["at"]
            self.dirty_custs.add(e.originator_id)
        return cust

    def registered(self, e: Event) -> None:
        s = e.state
        self.custs[e.originator_id] = {
            "name": s.get("name"),
            "identities": list(s["identities"]),
            "merged_into": None,
            "created_at": s["at"],
            "updated_at": s["at"],
        }
        self.dirty_custs.add(e.originator_id)

    def identity_added(self, e: Event) -> None:
        cust = self._customer_event(e)
        if cust is not None and e.state["identity"] not in cust["identities"]:
            cust["identities"].append(e.state["identity"])

    def name_learned(self, e: Event) -> None:
        cust = self._customer_event(e)
        if cust is not None:
            cust["name"] = e.state["name"]

    def forgotten(self, e: Event) -> None:
        """A customer's personal data was erased: so is what the inbox shows of it."""
        cust = self._customer_event(e)
        if cust is not None:
            cust["name"] = None
            cust["identities"] = list(e.state["identities"])
        for conv_id in e.state["conversations"]:
            row = self._conv(conv_id)
            if row is not None and row[LAST_TEXT]:
                row[LAST_TEXT] = "[forgotten]"
                self._changed(conv_id, row)
        self.tx.execute(f"DELETE FROM {self.claim_table} WHERE customer_id=?", (e.originator_id,))
        for claim_id in [k for k, c in self.claims.items() if c["customer_id"] == e.originator_id]:
            del self.claims[claim_id]
            self.dirty_claims.discard(claim_id)

    def _move_conversations(self, conversation_ids: Iterable[str], owner: str) -> None:
        for conv_id in conversation_ids:
            row = self._conv(conv_id)
            if row is not None:
                row[OWNER_ID] = owner
                self._changed(conv_id, row)

    def merged(self, e: Event) -> None:
        cust = self._customer_event(e)
        if cust is None:
            return
        s = e.state
        cust["identities"].extend(i for i in s["identities"] if i not in cust["identities"])
        self._move_conversations(s["conversations"], e.originator_id)

    def merged_into(self, e: Event) -> None:
        cust = self._customer_event(e)
        if cust is not None:
            cust["merged_into"] = e.state["target"]

    def merge_undone(self, e: Event) -> None:
        cust = self._customer_event(e)
        if cust is None:
            return
        s = e.state
        gone = set(s["identities"])
        cust["identities"] = [i for i in cust["identities"] if i not in gone]
        self._move_conversations(s["conversations"], s["other"])

    def restored(self, e: Event) -> None:
        cust = self._customer_event(e)
        if cust is not None:
            cust["merged_into"] = None

    # -- identity claims ----------------------------------------------------------------

    def claimed(self, e: Event) -> None:
        self.claims[e.originator_id] = {
            "key": e.state["key"],
            "customer_id": e.state["customer_id"],
        }
        self.dirty_claims.add(e.originator_id)

    def reassigned(self, e: Event) -> None:
        claim = self.claims.get(e.originator_id)
        if claim is None:
            self._load(
                self.claim_table, _CLAIM_COLUMNS, {e.originator_id}, self.claims, _claim_from_row
            )
            claim = self.claims.get(e.originator_id)
        if claim is not None:
            claim["customer_id"] = e.state["customer_id"]
            self.dirty_claims.add(e.originator_id)


def _when(at: str | None) -> datetime | None:
    return None if at is None else parse_iso(at)


def _conv_from_row(row: tuple[Any, ...]) -> list[Any]:
    return list(row)


def _cust_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip(_CUST_COLUMNS, row, strict=True))
    record["identities"] = orjson.loads(record["identities"])
    return record


def _claim_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(_CLAIM_COLUMNS, row, strict=True))


# ----------------------------------------------------------------------------- queries

# What a list item shows, in this order; `updated_at` and `id` last for the recency sort.
_ITEM_COLUMNS = (
    "c.owner_id, cu.name, cu.identities, c.channels, c.status, c.assignee, c.queue, "
    "c.priority, c.offered_to, c.escalated, c.last_channel, c.last_text, c.last_at, "
    "c.last_direction, c.waiting_since, c.sla_due_at, c.opened_at, c.updated_at, c.id"
)


def _recency(row: tuple[Any, ...]) -> tuple[str, str]:
    return row[-2], row[-1]


def _item(row: tuple[Any, ...]) -> dict[str, Any]:
    # Unpacked, not zipped into a dict first: a page builds 50 of these per request.
    (
        owner_id,
        name,
        identities,
        channels,
        status,
        assignee,
        queue,
        priority,
        offered_to,
        escalated,
        last_channel,
        last_text,
        last_at,
        last_direction,
        waiting_since,
        sla_due_at,
        opened_at,
        updated_at,
        conversation_id,
    ) = row
    return {
        "id": conversation_id,
        "customer": {
            "id": owner_id,
            "name": name,
            "identities": orjson.loads(identities) if identities else [],
        },
        "channels": orjson.loads(channels),
        "status": status,
        "assignee": assignee,
        "queue": queue,
        "priority": priority,
        "offered_to": offered_to,
        "escalated": bool(escalated),
        "last_message": _last_message(last_channel, last_text, last_at, last_direction),
        "waiting_since": waiting_since,
        "sla_due_at": sla_due_at,
        "opened_at": opened_at,
        "updated_at": updated_at,
    }


def _has_channel(channel: str) -> str:
    """A condition on the channels column; `channel` must be one of KNOWN_CHANNELS (it is
    written into the statement: a partial index is only used for its literal expression)."""
    return f"channels LIKE '%\"{channel}\"%'"


def _last_message(
    channel: str | None, text: str | None, at: str | None, direction: str | None
) -> dict[str, Any] | None:
    if at is None:
        return None
    return {"channel": channel, "text": text, "at": at, "direction": direction}


def encode_cursor(updated_at: str, conversation_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([updated_at, conversation_id])).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, orjson.JSONDecodeError, ValueError) as exc:
        raise QueryError("invalid cursor") from exc
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise QueryError("invalid cursor")
    return value[0], value[1]


def _tables(tx: Tx) -> tuple[str, str, str] | None:  # conversations, customers, claims
    conv = active_table(tx, NAME, CONVERSATIONS)
    if conv is None:
        return None
    generation = conv.rsplit("_g", 1)[1]
    return conv, f"{CUSTOMERS}_g{generation}", f"{CLAIMS}_g{generation}"


def _identified(tx: Tx, claim_table: str, customer: str) -> str | None:
    """A customer id as given, or the owner of an identity key (None when nobody owns it)."""
    if ":" not in customer:
        return customer
    try:
        key = parse_key(customer)
    except InvalidIdentity as exc:
        raise QueryError(str(exc)) from exc
    tx.execute(f"SELECT customer_id FROM {claim_table} WHERE key=?", (key,))
    row = tx.fetchone()
    return None if row is None else str(row[0])


def _resolve_customer(tx: Tx, tables: tuple[str, str, str], customer: str) -> str | None:
    """A customer id or identity key -> the id of the customer it shows under now."""
    _, cust_table, claim_table = tables
    found = _identified(tx, claim_table, customer.strip())
    if found is None:
        return None
    customer = found
    for _ in range(32):
        tx.execute(f"SELECT merged_into FROM {cust_table} WHERE id=?", (customer,))
        row = tx.fetchone()
        if row is None or row[0] is None:
            return customer
        customer = row[0]
    return customer


def _statuses(status: str | None) -> list[str] | None:
    if status is None:
        return [OPEN, PENDING]
    if status == "all":
        return None
    wanted = [s.strip() for s in status.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown or not wanted:
        raise QueryError(f"status must be open, pending, resolved or all, not {status!r}")
    return wanted


def _scope_clause(agent: str, forbidden: Sequence[str]) -> str:
    """An agent's scope as one condition (see list_conversations)."""
    marks = ",".join("?" * len(forbidden))
    not_forbidden = f" AND c.queue NOT IN ({marks})" if forbidden else ""
    return (
        "(c.assignee=? OR c.offered_to=? OR "
        f"(c.assignee IS NULL AND c.queue IS NOT NULL{not_forbidden}))"
    )


def _scope_params(agent: str, forbidden: Sequence[str]) -> list[Any]:
    return [agent, agent, *forbidden]


def _unassigned_queues(tx: Tx, conv_table: str) -> list[str]:
    """The queues that hold an unassigned conversation: one index seek per queue (a skip
    scan in one statement), not a walk over the rows."""
    tx.execute(
        "WITH RECURSIVE q(name) AS ("
        f"SELECT MIN(queue) FROM {conv_table} WHERE assignee IS NULL AND queue IS NOT NULL "
        "UNION ALL SELECT (SELECT MIN(queue) FROM "
        f"{conv_table} WHERE assignee IS NULL AND queue > q.name) FROM q "
        "WHERE q.name IS NOT NULL) SELECT name FROM q WHERE name IS NOT NULL"
    )
    return [str(row[0]) for row in tx.fetchall()]


def _scope_branches(
    tx: Tx, conv_table: str, agent: str, forbidden: Sequence[str]
) -> list[tuple[str, list[Any]]]:
    """The scope as a union of conditions that each walk an index in recency order: assigned
    to the agent, offered to them, and unassigned in each queue they may take. One OR'd
    condition made the database walk every more recent row of the status (10,000 rows,
    40 ms, when the newest rows are other agents' conversations)."""
    branches: list[tuple[str, list[Any]]] = [
        ("c.assignee=?", [agent]),
        ("c.offered_to=?", [agent]),
    ]
    excluded = set(forbidden)
    for queue in _unassigned_queues(tx, conv_table):
        if queue not in excluded:
            branches.append(("c.assignee IS NULL AND c.queue=?", [queue]))
    return branches


def _scoped_rows(
    tx: Tx,
    sql: str,
    conv_table: str,
    scope: tuple[str, Sequence[str]],
    statuses: Sequence[str],
    where: Sequence[str],
    params: Sequence[Any],
    wanted: int,
) -> list[tuple[Any, ...]]:
    """The `wanted` most recent item rows in an agent's scope: the first `wanted` of each
    status and branch (index only), then their rows in recency order, all in one statement.
    One statement, not one per branch: under load each call into SQLite (each row fetched)
    gives up the GIL and can wait milliseconds to get it back. `IN` counts a conversation
    that two branches match (offered to the agent and in their queue) once."""
    parts: list[str] = []
    values: list[Any] = []
    for condition, branch_values in _scope_branches(tx, conv_table, *scope):
        for status in statuses:
            clause = " AND ".join(["c.status=?", condition, *where])
            parts.append(
                f"SELECT id FROM (SELECT c.id FROM {conv_table} c WHERE {clause} "
                f"ORDER BY c.updated_at DESC, c.id DESC LIMIT ?) b{len(parts)}"
            )
            values.extend([status, *branch_values, *params, wanted])
    tx.execute(
        f"{sql} WHERE c.id IN ({' UNION ALL '.join(parts)}) "
        "ORDER BY c.updated_at DESC, c.id DESC LIMIT ?",
        [*values, wanted],
    )
    return tx.fetchall()


def list_conversations(
    db: ReadModelDB,
    *,
    status: str | None = None,
    assignee: str | None = None,
    queue: str | None = None,
    channel: str | None = None,
    customer: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    scope: tuple[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The inbox: conversations, most recently updated first, `{"items": [...], "next": ...}`.

    `status`: open, pending, resolved, a comma list of them, or "all" (default: open and
    pending). `customer`: a customer id or an identity key (`email:...`, `phone:+...`); a
    merged customer's conversations show under the customer it was merged into. `next` is an
    opaque cursor for the following page, None on the last. `scope` (agent, queues they lack
    the skill for) limits an agent to what is assigned or offered to them and the unassigned
    conversations of the other queues (not of no queue: routing has not reached those yet).
    Raises QueryError on bad input."""
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be from 1 to {MAX_LIMIT}")
    statuses = _statuses(status)
    after = decode_cursor(cursor) if cursor else None
    with db.read() as tx:
        tables = _tables(tx)
        if tables is None:
            return {"items": [], "next": None}
        conv_table, cust_table, _ = tables
        where: list[str] = []
        params: list[Any] = []
        if assignee is not None:
            where.append("c.assignee=?")
            params.append(assignee)
        if queue is not None:
            where.append("c.queue=?")
            params.append(queue)
        if channel is not None:
            if channel not in KNOWN_CHANNELS:
                raise QueryError(f"unknown channel {channel!r}")
            # the very expression of the channel's partial index, so the database can use it
            where.append(f"c.{_has_channel(channel)}")
        if customer is not None:
            owner = _resolve_customer(tx, tables, customer)
            if owner is None:
                return {"items": [], "next": None}
            where.append("c.owner_id=?")
            params.append(owner)
        if scope is not None and customer is not None:
            # one customer's conversations are few: filter them in one statement
            where.append(_scope_clause(*scope))
            params.extend(_scope_params(*scope))
        if after is not None:
            # a row value, so the index seeks to the cursor instead of walking down to it
            where.append("(c.updated_at, c.id) < (?, ?)")
            params.extend(after)
        sql = (
            f"SELECT {_ITEM_COLUMNS} FROM {conv_table} c "
            f"LEFT JOIN {cust_table} cu ON cu.id = c.owner_id"
        )
        order = " ORDER BY c.updated_at DESC, c.id DESC LIMIT ?"
        if scope is not None and customer is None:
            every = statuses or sorted(STATUSES)
            rows = _scoped_rows(tx, sql, conv_table, scope, every, where, params, limit + 1)
        elif statuses is None or customer is not None:
            # one customer's conversations are few: the owner index finds them all
            if statuses is not None:
                where.append(f"c.status IN ({','.join('?' * len(statuses))})")
                params.extend(statuses)
            clause = " WHERE " + " AND ".join(where) if where else ""
            rows = tx.execute(sql + clause + order, [*params, limit + 1]).fetchall()
        else:
            # One ordered, limited query per status, merged here: `status IN (...)` with the
            # ORDER BY made the database sort every open row (800 ms at 100,000); each of
            # these walks the (status, updated_at, id) index and stops after limit + 1.
            pages = []
            for status in statuses:
                clause = " WHERE " + " AND ".join(["c.status=?", *where])
                found = tx.execute(sql + clause + order, [status, *params, limit + 1]).fetchall()
                pages.append(found)
            by_recency = heapq.merge(*pages, key=_recency, reverse=True)
            rows = list(itertools.islice(by_recency, limit + 1))
    items = [_item(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_cursor(last["updated_at"], last["id"])
    return {"items": items, "next": next_cursor}


def get_item(tx: Tx, conversation_id: str) -> dict[str, Any] | None:
    """One conversation's list item, in a read transaction the caller holds."""
    tables = _tables(tx)
    if tables is None:
        return None
    conv_table, cust_table, _ = tables
    tx.execute(
        f"SELECT {_ITEM_COLUMNS} FROM {conv_table} c "
        f"LEFT JOIN {cust_table} cu ON cu.id = c.owner_id WHERE c.id=?",
        (conversation_id,),
    )
    row = tx.fetchone()
    return None if row is None else _item(row)


def item_position(tx: Tx, conversation_id: str) -> int:
    """The notification id of the last event that changed a conversation's item (0 when
    there is none)."""
    tables = _tables(tx)
    if tables is None:
        return 0
    tx.execute(f"SELECT position FROM {tables[0]} WHERE id=?", (conversation_id,))
    row = tx.fetchone()
    return 0 if row is None else int(row[0])


def conversations_of(tx: Tx, owner_id: str) -> list[dict[str, Any]]:
    """The conversations a customer shows with now, newest first (id, status, opened_at,
    last_message)."""
    tables = _tables(tx)
    if tables is None:
        return []
    tx.execute(
        "SELECT id, status, opened_at, last_channel, last_text, last_at, last_direction "
        f"FROM {tables[0]} WHERE owner_id=? ORDER BY opened_at DESC, id DESC",
        (owner_id,),
    )
    return [
        {
            "id": conv_id,
            "status": status,
            "opened_at": opened_at,
            "last_message": _last_message(channel, text, at, direction),
        }
        for conv_id, status, opened_at, channel, text, at, direction in tx.fetchall()
    ]


def get_customer(db: ReadModelDB, customer_id: str) -> dict[str, Any] | None:
    """A customer (by id or identity key): id, name, identities, merged_into, and the
    conversations it shows with, newest first. None when unknown."""
    with db.read() as tx:
        tables = _tables(tx)
        if tables is None:
            return None
        identified = _identified(tx, tables[2], customer_id)
        if identified is None:
            return None
        customer_id = identified
        tx.execute(
            f"SELECT id, name, identities, merged_into, created_at FROM {tables[1]} WHERE id=?",
            (customer_id,),
        )
        row = tx.fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "name": row[1],
            "identities": orjson.loads(row[2]),
            "merged_into": row[3],
            "created_at": row[4],
            "conversations": conversations_of(tx, row[0]),
        }
