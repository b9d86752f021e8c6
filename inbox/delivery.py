"""Outbound delivery: every reply an agent queued is sent through its channel, once, and its
outcome comes back into the conversation like any channel receipt.

Two parts share the `outbox` table of the read-model database:

- the **outbox follower** reads `Conversation.ReplyQueued` from the event store's notification
  log and inserts one `outbox` row per reply, in the same transaction as its own position (the
  `outbox_position` table), so every queued reply becomes exactly one row across crashes and
  across several delivery processes. It is not a projection: rebuilding it from the first
  event would send every reply ever written again, so it stays out of `projections.replay`.
- the **dispatcher** claims due rows, builds an `OutboundMessage` from the event store (the
  conversation, its customer after merges, the customer's address on the channel, the email
  threading headers), hands it to the channel's `ChannelSender`, records the outcome on the row
  and publishes a `delivery.status` contact event (event id `delivery:<message id>:<status>`),
  which the ingest worker records as `Conversation.DeliveryStatusRecorded`.

Statuses: `pending` (waiting for its first attempt or for a retry), `sent`, `failed` (refused
for good, or still failing after `max_attempts`), `held` (no sender for the channel, or no
address for the customer on it: kept undelivered with the reason, no event).

Delivery is at least once: a process that stops between a send and its mark sends again when
the row's lease runs out. The message carries our stable `message_id`, so a channel that can
deduplicate does. See docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import PersistenceError
from eventsourcing.utils import get_topic

from adapters.kafka import PublishFailed
from adapters.outbound import (
    ChannelSender,
    OutboundMessage,
    PermanentFailure,
    SendResult,
    TemporaryFailure,
)
from inbox.contact import ContactEvent, CustomerRef, Social, ThreadRef, validate
from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer
from inbox.domain.time import Clock, iso, system_clock
from inbox.identity import InvalidIdentity, normalise_phone
from inbox.ports import Publisher
from inbox.thread_tokens import conversation_token
from infra.store import EventStore
from projections.db import DatabaseError, IntegrityError, ReadModelDB, Tx

log = logging.getLogger(__name__)

OUTBOX_TABLE = "outbox"
POSITION_TABLE = "outbox_position"
FOLLOWER = "outbox"
REPLY_QUEUED_TOPIC = get_topic(Conversation.ReplyQueued)
# The satisfaction survey goes out like a reply (same fields: message_id, channel, text).
SURVEY_QUEUED_TOPIC = get_topic(Conversation.SurveyQueued)

PENDING, SENT, FAILED, HELD = "pending", "sent", "failed", "held"
STATUSES = frozenset({PENDING, SENT, FAILED, HELD})

# Errors of the store or the read-model database that a later round may not meet again.
_STORAGE_ERRORS: tuple[type[Exception], ...] = (*DatabaseError, PersistenceError)
_COLUMNS = (
    "message_id, seq, conversation_id, channel, text, actor, queued_at, status, attempts, "
    "next_attempt_at, last_error, provider_id, recipient, reported_as, reported, updated_at"
)
_COLUMN_NAMES = tuple(_COLUMNS.split(", "))


@dataclass(frozen=True)
class OutboxEntry:
    """One queued reply and where its delivery stands."""

    message_id: str
    seq: int  # the notification id of its ReplyQueued: replies of a conversation go in order
    conversation_id: str
    channel: str
    text: str
    actor: str
    queued_at: str
    status: str  # pending | sent | failed | held
    attempts: int  # sends started
    next_attempt_at: str
    last_error: str | None
    provider_id: str | None
    recipient: str | None  # the identity key the reply went to (`email:...`, `phone:...`)
    reported_as: (
        str | None
    )  # the delivery.status published (or to publish): sent | delivered | failed
    reported: bool  # Kafka acknowledged the delivery.status event
    updated_at: str


def _entry(row: Sequence[Any]) -> OutboxEntry:
    return OutboxEntry(
        message_id=str(row[0]),
        seq=int(row[1]),
        conversation_id=str(row[2]),
        channel=str(row[3]),
        text=str(row[4]),
        actor=str(row[5]),
        queued_at=str(row[6]),
        status=str(row[7]),
        attempts=int(row[8]),
        next_attempt_at=str(row[9]),
        last_error=None if row[10] is None else str(row[10]),
        provider_id=None if row[11] is None else str(row[11]),
        recipient=None if row[12] is None else str(row[12]),
        reported_as=None if row[13] is None else str(row[13]),
        reported=bool(row[14]),
        updated_at=str(row[15]),
    )


def ensure_outbox_tables(db: ReadModelDB) -> None:
    """Creates the outbox tables and the follower's position row, when missing."""
    if db.table_exists(OUTBOX_TABLE) and db.table_exists(POSITION_TABLE):
        # No DDL on a running system: on PostgreSQL even `CREATE INDEX IF NOT EXISTS` takes a
        # SHARE lock on the table, which would queue behind (and deadlock with) a follower.
        return
    for attempt in range(3):
        try:
            _create_outbox_tables(db)
            return
        except IntegrityError:
            # Two processes creating the same table at the same moment (PostgreSQL's catalog
            # refuses the second): it exists now.
            if attempt == 2:
                raise


def _create_outbox_tables(db: ReadModelDB) -> None:
    with db.transaction() as tx:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {OUTBOX_TABLE} ("
            "message_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, conversation_id TEXT NOT NULL, "
            "channel TEXT NOT NULL, text TEXT NOT NULL, actor TEXT NOT NULL, "
            "queued_at TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL, "
            "next_attempt_at TEXT NOT NULL, last_error TEXT, provider_id TEXT, recipient TEXT, "
            "reported_as TEXT, reported INTEGER NOT NULL, updated_at TEXT NOT NULL)"
        )
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {OUTBOX_TABLE}_due "
            f"ON {OUTBOX_TABLE} (status, next_attempt_at)"
        )
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {OUTBOX_TABLE}_conversation "
            f"ON {OUTBOX_TABLE} (conversation_id, seq)"
        )
        tx.execute(
            f"CREATE INDEX IF NOT EXISTS {OUTBOX_TABLE}_unreported "
            f"ON {OUTBOX_TABLE} (reported, seq)"
        )
    # The position table last, in a transaction of its own: while it exists without the
    # outbox, a process takes the slow path above and waits for no lock the follower holds.
    with db.transaction() as tx:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {POSITION_TABLE} ("
            "name TEXT PRIMARY KEY, position BIGINT NOT NULL, updated_at TEXT)"
        )
        tx.execute(
            f"INSERT INTO {POSITION_TABLE} (name, position, updated_at) VALUES (?, 0, NULL) "
            "ON CONFLICT (name) DO NOTHING",
            (FOLLOWER,),
        )


def outbox_status(db: ReadModelDB, message_id: str) -> OutboxEntry | None:
    """Where the delivery of reply `message_id` stands; None for an unknown id (or before the
    delivery process first ran)."""
    if not db.table_exists(OUTBOX_TABLE):
        return None
    with db.read() as tx:
        tx.execute(f"SELECT {_COLUMNS} FROM {OUTBOX_TABLE} WHERE message_id=?", (message_id,))
        row = tx.fetchone()
    return None if row is None else _entry(row)


def outbox_position(db: ReadModelDB) -> int:
    """The last notification id the outbox follower has taken in."""
    with db.read() as tx:
        tx.execute(f"SELECT position FROM {POSITION_TABLE} WHERE name=?", (FOLLOWER,))
        row = tx.fetchone()
    return 0 if row is None else int(row[0])


# -- the customer's address on a channel ----------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    to: str  # what the sender addresses: email, E.164 phone, visitor id, social id
    key: str  # the identity key it came from: the customer of the delivery.status event


class Undeliverable(Exception):
    """The reply cannot be sent as things stand (no address on the channel): it is held."""


def recipient_for(channel: str, identities: Sequence[str]) -> Recipient | None:
    """The customer's address on `channel`, from their identity keys (oldest first)."""

    def first(kind: str) -> str | None:
        prefix = kind + ":"
        return next((i[len(prefix) :] for i in identities if i.startswith(prefix)), None)

    if channel == "email":
        address = first("email")
        return None if address is None else Recipient(address, "email:" + address)
    if channel in ("sms", "whatsapp"):
        phone = first("phone")
        if phone is not None:
            return Recipient(phone, "phone:" + phone)
        wa_id = first("whatsapp") if channel == "whatsapp" else None
        if wa_id is not None:
            # A WhatsApp id is the customer's number without its '+'.
            try:
                return Recipient(normalise_phone(wa_id), "whatsapp:" + wa_id)
            except InvalidIdentity:
                return None
        return None
    if channel == "chat":
        visitor = first("visitor")
        return None if visitor is None else Recipient(visitor, "visitor:" + visitor)
    if channel in ("messenger", "instagram"):
        social = first(channel)
        return None if social is None else Recipient(social, f"{channel}:{social}")
    return None


def customer_ref(key: str) -> CustomerRef:
    """The contact event's customer for an identity key (the inverse of its Kafka key)."""
    kind, _, value = key.partition(":")
    if kind == "email":
        return CustomerRef(email=value)
    if kind == "phone":
        return CustomerRef(phone=value)
    if kind == "visitor":
        return CustomerRef(visitor=value)
    return CustomerRef(social=Social(network=kind, id=value))


def build_message(store: EventStore, entry: OutboxEntry) -> tuple[OutboundMessage, Recipient]:
    """The message for one outbox row, from the event store. Raises Undeliverable."""
    conversation_id = UUID(entry.conversation_id)
    events = store.events_of(conversation_id)
    if not events:
        raise Undeliverable(f"conversation {entry.conversation_id} does not exist")
    conversation = store.get(conversation_id)
    if not isinstance(conversation, Conversation):
        raise Undeliverable(f"{entry.conversation_id} is not a conversation")
    customer = store.get(UUID(conversation.customer_id))
    seen: set[str] = set()
    # A merged customer's contacts go to the customer that absorbed them.
    while isinstance(customer, Customer) and customer.merged_into is not None:
        if customer.merged_into in seen:
            break
        seen.add(customer.merged_into)
        customer = store.get(UUID(customer.merged_into))
    if not isinstance(customer, Customer):
        raise Undeliverable(f"the customer of conversation {entry.conversation_id} is unknown")
    recipient = recipient_for(entry.channel, customer.identities)
    if recipient is None:
        raise Undeliverable(f"the customer has no {_ADDRESS.get(entry.channel, 'address')}")
    inbound = [
        e
        for e in events
        if isinstance(e, Conversation.MessageReceived)
        and e.channel == entry.channel
        and not e.automatic
    ]
    last = inbound[-1] if inbound else None
    subject = in_reply_to = None
    references: tuple[str, ...] = ()
    if entry.channel == "email" and last is not None:
        subject, in_reply_to = last.subject, last.message_id
        # The customer's message ids in this conversation, newest first, then the ones their
        # last message referred to (our own Message-IDs among them).
        ids = [e.message_id for e in reversed(inbound) if e.message_id]
        references = tuple(dict.fromkeys([*ids, *last.in_reply_to]))
    message = OutboundMessage(
        message_id=entry.message_id,
        conversation_id=entry.conversation_id,
        channel=entry.channel,
        text=entry.text,
        to=recipient.to,
        customer_name=customer.name,
        subject=subject,
        in_reply_to=in_reply_to,
        references=references,
        last_inbound_at=None if last is None else last.at,
        # Our account the customer last wrote to on this channel: the reply goes out from it.
        via=None if last is None else last.via,
        attempt=entry.attempts,
    )
    return message, recipient


_ADDRESS = {
    "email": "email address",
    "sms": "phone number",
    "whatsapp": "phone number or WhatsApp id",
    "chat": "chat visitor id",
    "messenger": "Messenger id",
    "instagram": "Instagram id",
    "voice": "address for a text reply on voice",
}


# -- the outcome of one attempt -------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: str  # sent | pending (retry) | failed | held
    error: str | None = None
    result: SendResult | None = None
    recipient: Recipient | None = None


@dataclass(frozen=True)
class RoundResult:
    """What one `run_once` did (for tests and logs)."""

    queued: int  # outbox rows inserted
    attempted: int  # sends started
    held: int
    reported: int  # delivery.status events Kafka acknowledged


class _PositionMoved(Exception):
    """Another follower moved the outbox position first: this batch is rolled back."""


class DeliveryService:
    """The outbox follower and the dispatcher.

    `senders`: one `ChannelSender` per channel name (`email`, `sms`, `whatsapp`, `chat`,
    `messenger`, `instagram`); a channel without one keeps its replies `held`, with
    `hold_reasons[channel]` (or a generic reason) as the row's `last_error`.
    Retries: after attempt n failed temporarily, the next comes `retry_base * 2**(n-1)`
    seconds later (at most `max_backoff`); after `max_attempts` the reply is `failed`.
    A claimed row is leased for `send_timeout + lease_margin` seconds: if the process stops
    before recording the outcome, another round sends it again after that."""

    def __init__(
        self,
        store: EventStore,
        db: ReadModelDB,
        senders: Mapping[str, ChannelSender],
        publisher: Publisher,
        *,
        clock: Clock = system_clock,
        max_attempts: int = 5,
        retry_base: float = 5.0,
        max_backoff: float = 3600.0,
        send_timeout: float = 60.0,
        lease_margin: float = 30.0,
        poll_interval: float = 0.5,
        batch_size: int = 500,
        concurrency: int = 8,
        hold_reasons: Mapping[str, str] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.store = store
        self.db = db
        self.senders = dict(senders)
        self.publisher = publisher
        self.clock = clock
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.max_backoff = max_backoff
        self.send_timeout = send_timeout
        self.lease = send_timeout + lease_margin
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.hold_reasons = dict(hold_reasons or {})
        self._ready = False

    # -- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Creates the tables (idempotent; synchronous)."""
        if not self._ready:
            ensure_outbox_tables(self.db)
            self._ready = True

    def _now(self) -> str:
        return iso(self.clock())

    def _later(self, seconds: float) -> str:
        return iso(self.clock() + timedelta(seconds=seconds))

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after `attempts` failed attempts."""
        return float(min(self.retry_base * 2 ** max(attempts - 1, 0), self.max_backoff))

    # -- the outbox follower (synchronous: run it in a thread) ------------------------------

    def follow_once(self) -> int:
        """Takes in the next batch of the log; returns the outbox rows inserted."""
        return self._follow_step()[0]

    def follow_until_caught_up(self) -> int:
        """Takes in the log up to its head; returns the outbox rows inserted."""
        total = 0
        while True:
            inserted, more = self._follow_step()
            total += inserted
            if not more:
                return total

    def _follow_step(self) -> tuple[int, bool]:
        """(rows inserted, whether there is more to read right away)."""
        self.setup()
        position = outbox_position(self.db)
        head = self.store.max_notification_id()
        if head < position:
            return self._behind(position, head), True
        if head == position:
            return 0, False
        notifications = self.store.recorder.select_notifications(
            position,
            self.batch_size,
            stop=head,
            topics=[REPLY_QUEUED_TOPIC, SURVEY_QUEUED_TOPIC],
            inclusive_of_start=False,
        )
        full = len(notifications) == self.batch_size
        # A batch that is not full read everything up to `head`: the position moves over the
        # events that are not replies too, so the next query starts near the head.
        new_position = notifications[-1].id if full else head
        now = self._now()
        rows = []
        for n in notifications:
            state = orjson.loads(n.state)
            rows.append(
                (
                    str(state["message_id"]),
                    n.id,
                    str(n.originator_id),
                    str(state["channel"]),
                    str(state["text"]),
                    str(state.get("actor") or ""),
                    str(state.get("at") or now),
                    PENDING,
                    0,
                    now,
                    None,
                    None,
                    None,
                    None,
                    0,
                    now,
                )
            )
        try:
            with self.db.transaction() as tx:
                tx.execute(
                    f"UPDATE {POSITION_TABLE} SET position=?, updated_at=? "
                    "WHERE name=? AND position=?",
                    (new_position, now, FOLLOWER, position),
                )
                if tx.rowcount != 1:
                    raise _PositionMoved
                tx.insert_many(
                    OUTBOX_TABLE, _COLUMN_NAMES, rows, "ON CONFLICT (message_id) DO NOTHING"
                )
        except _PositionMoved:
            # Nothing of this batch was written; read again from where the other one got.
            log.info("outbox position moved by another follower; reading again")
            return 0, True
        return len(rows), full

    def _behind(self, position: int, head: int) -> int:
        """The event store ends before what was taken in: it was restored from an older
        backup. What it holds up to its head was taken in; what it records next is new,
        though its ids were taken in once already, so the position moves back to its head
        (waiting for the store to pass the old position would skip those replies)."""
        log.warning(
            "outbox follower: at position %d, but the event store ends at %d (restored from "
            "a backup?): following it from there",
            position,
            head,
        )
        with self.db.transaction() as tx:
            tx.execute(
                f"UPDATE {POSITION_TABLE} SET position=?, updated_at=? WHERE name=? AND position=?",
                (head, self._now(), FOLLOWER, position),
            )
        return 0

    # -- the dispatcher -------------------------------------------------------------------

    def _due(self) -> list[OutboxEntry]:
        """Pending rows whose time has come, oldest first, at most one per conversation: a
        reply waits for the earlier replies of its conversation, so they arrive in order."""
        with self.db.read() as tx:
            tx.execute(
                f"SELECT {_COLUMNS} FROM {OUTBOX_TABLE} o "
                "WHERE o.status=? AND o.next_attempt_at<=? AND NOT EXISTS ("
                f"SELECT 1 FROM {OUTBOX_TABLE} p WHERE p.conversation_id=o.conversation_id "
                "AND p.status=? AND p.seq<o.seq) ORDER BY o.seq LIMIT ?",
                (PENDING, self._now(), PENDING, self.concurrency),
            )
            return [_entry(row) for row in tx.fetchall()]

    def _claim(self, entry: OutboxEntry) -> OutboxEntry | None:
        """Counts the attempt and leases the row, unless another dispatcher did first."""
        now = self._now()
        lease_until = self._later(self.lease)
        with self.db.transaction() as tx:
            tx.execute(
                f"UPDATE {OUTBOX_TABLE} SET attempts=attempts+1, next_attempt_at=?, updated_at=? "
                "WHERE message_id=? AND status=? AND attempts=? AND next_attempt_at<=?",
                (lease_until, now, entry.message_id, PENDING, entry.attempts, now),
            )
            if tx.rowcount != 1:
                return None
        return replace(entry, attempts=entry.attempts + 1, next_attempt_at=lease_until)

    def _hold(self, tx: Tx, entry: OutboxEntry, reason: str) -> None:
        tx.execute(
            f"UPDATE {OUTBOX_TABLE} SET status=?, last_error=?, updated_at=? "
            "WHERE message_id=? AND status=?",
            (HELD, reason, self._now(), entry.message_id, PENDING),
        )

    def _record(self, entry: OutboxEntry, outcome: Outcome) -> None:
        """The outcome of a claimed attempt. The first outcome recorded wins: a row another
        dispatcher finished meanwhile (after a lease ran out) is left as it is."""
        now = self._now()
        recipient = outcome.recipient.key if outcome.recipient else None
        with self.db.transaction() as tx:
            if outcome.status == HELD:
                self._hold(tx, entry, outcome.error or "held")
            elif outcome.status == SENT:
                result = outcome.result or SendResult(provider_id=None)
                tx.execute(
                    f"UPDATE {OUTBOX_TABLE} SET status=?, last_error=NULL, provider_id=?, "
                    "recipient=?, reported_as=?, reported=0, updated_at=? "
                    "WHERE message_id=? AND status=?",
                    (
                        SENT,
                        result.provider_id,
                        recipient,
                        result.status,
                        now,
                        entry.message_id,
                        PENDING,
                    ),
                )
            elif outcome.status == FAILED:
                tx.execute(
                    f"UPDATE {OUTBOX_TABLE} SET status=?, last_error=?, recipient=?, "
                    "reported_as=?, reported=0, updated_at=? WHERE message_id=? AND status=?",
                    (FAILED, outcome.error, recipient, FAILED, now, entry.message_id, PENDING),
                )
            else:
                tx.execute(
                    f"UPDATE {OUTBOX_TABLE} SET next_attempt_at=?, last_error=?, recipient=?, "
                    "updated_at=? WHERE message_id=? AND status=?",
                    (
                        self._later(self.backoff(entry.attempts)),
                        outcome.error,
                        recipient,
                        now,
                        entry.message_id,
                        PENDING,
                    ),
                )

    async def dispatch_once(self) -> tuple[int, int]:
        """Sends what is due (up to `concurrency` at once); returns (attempted, held)."""
        await asyncio.to_thread(self.setup)
        due = await asyncio.to_thread(self._due)
        held = 0
        sendable: list[OutboxEntry] = []
        for entry in due:
            if entry.channel in self.senders:
                sendable.append(entry)
                continue
            reason = self.hold_reasons.get(
                entry.channel,
                f"no sender is configured for {entry.channel}: the reply is kept undelivered",
            )
            await asyncio.to_thread(self._record, entry, Outcome(HELD, reason))
            log.warning("reply %s held: %s", entry.message_id, reason)
            held += 1
        outcomes = await asyncio.gather(*(self._attempt(entry) for entry in sendable))
        attempted = sum(1 for o in outcomes if o is not None and o.status != HELD)
        held += sum(1 for o in outcomes if o is not None and o.status == HELD)
        return attempted, held

    async def _attempt(self, entry: OutboxEntry) -> Outcome | None:
        try:
            claimed = await asyncio.to_thread(self._claim, entry)
            if claimed is None:
                return None  # another dispatcher has it
            outcome = await self._send(claimed)
            await asyncio.to_thread(self._record, claimed, outcome)
        except _STORAGE_ERRORS as exc:
            # The row stays leased; it is tried again when the lease runs out.
            log.warning("delivery of %s interrupted by the database: %r", entry.message_id, exc)
            return None
        if outcome.status == HELD:
            log.warning("reply %s held: %s", entry.message_id, outcome.error)
        elif outcome.status != SENT:
            log.info(
                "reply %s attempt %d: %s (%s)",
                entry.message_id,
                claimed.attempts,
                outcome.status,
                outcome.error,
            )
        return outcome

    async def _send(self, entry: OutboxEntry) -> Outcome:
        try:
            message, recipient = await asyncio.to_thread(build_message, self.store, entry)
        except Undeliverable as exc:
            return Outcome(HELD, str(exc))
        sender = self.senders[entry.channel]
        try:
            result = await asyncio.wait_for(sender.send(message), self.send_timeout)
        except PermanentFailure as exc:
            return Outcome(FAILED, _reason(exc), recipient=recipient)
        except TemporaryFailure as exc:
            error = _reason(exc)
        except TimeoutError:
            error = f"no answer from the {entry.channel} service in {self.send_timeout:g}s"
        except Exception as exc:
            # A sender's own bug must not stop delivery of everything else: it counts as a
            # failed attempt, with the error on the row and in the log.
            log.exception("the %s sender raised", entry.channel)
            error = f"{type(exc).__name__}: {_reason(exc)}"
        else:
            return Outcome(SENT, result=result, recipient=recipient)
        if entry.attempts >= self.max_attempts:
            return Outcome(
                FAILED, f"{error} (gave up after {entry.attempts} attempts)", recipient=recipient
            )
        return Outcome(PENDING, error, recipient=recipient)

    # -- reporting outcomes ---------------------------------------------------------------

    def _unreported(self) -> list[OutboxEntry]:
        with self.db.read() as tx:
            tx.execute(
                f"SELECT {_COLUMNS} FROM {OUTBOX_TABLE} WHERE reported=0 AND status IN (?, ?) "
                "ORDER BY seq LIMIT ?",
                (SENT, FAILED, self.batch_size),
            )
            return [_entry(row) for row in tx.fetchall()]

    def _mark_reported(self, message_id: str) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                f"UPDATE {OUTBOX_TABLE} SET reported=1, updated_at=? WHERE message_id=?",
                (self._now(), message_id),
            )

    def status_event(self, entry: OutboxEntry) -> ContactEvent:
        """The `delivery.status` contact event of a sent or failed row."""
        if entry.recipient is None or entry.reported_as is None:
            raise ValueError(f"reply {entry.message_id} has no recipient or status to report")
        payload: dict[str, Any] = {
            "message_id": entry.message_id,
            "status": entry.reported_as,
            "error": entry.last_error if entry.reported_as == FAILED else None,
            "provider_id": entry.provider_id,
        }
        event = ContactEvent(
            event_id=f"delivery:{entry.message_id}:{entry.reported_as}",
            occurred_at=self.clock(),
            channel=entry.channel,  # type: ignore[arg-type]
            type="delivery.status",
            customer=customer_ref(entry.recipient),
            # The conversation token: ingest puts the status into this conversation even when
            # the customer has started a newer one since.
            thread=ThreadRef(ref=conversation_token(entry.conversation_id)),
            payload=payload,
        )
        return validate(event, now=self.clock())

    async def report_once(self) -> int:
        """Publishes the outcomes not yet acknowledged by Kafka; returns how many were."""
        await asyncio.to_thread(self.setup)
        reported = 0
        while True:
            entries = await asyncio.to_thread(self._unreported)
            for entry in entries:
                try:
                    event = self.status_event(entry)
                except ValueError as exc:  # InvalidContactEvent among them
                    log.error("no delivery.status for %s: %s", entry.message_id, exc)
                    await asyncio.to_thread(self._mark_reported, entry.message_id)
                    continue
                try:
                    await self.publisher.publish(event)
                except PublishFailed as exc:
                    # Kafka is down: the row stays unreported and a later round publishes it
                    # (the same event id, so ingest records it once).
                    log.warning("delivery.status of %s not published: %s", entry.message_id, exc)
                    return reported
                await asyncio.to_thread(self._mark_reported, entry.message_id)
                reported += 1
            if len(entries) < self.batch_size:
                return reported

    # -- running --------------------------------------------------------------------------

    async def run_once(self) -> RoundResult:
        """One round: follow the log to its head, send everything that is due (in order within
        each conversation), report the outcomes."""
        queued = await asyncio.to_thread(self.follow_until_caught_up)
        attempted = held = 0
        while True:
            # A reply settled in one pass lets the next of its conversation go in the next.
            more = await self.dispatch_once()
            if more == (0, 0):
                break
            attempted, held = attempted + more[0], held + more[1]
        reported = await self.report_once()
        return RoundResult(queued=queued, attempted=attempted, held=held, reported=reported)

    async def run(self, stop: asyncio.Event) -> None:
        """The follower and the dispatcher until `stop` is set."""
        await asyncio.to_thread(self.setup)
        wake = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_loop(stop, wake))
            tasks.create_task(self._dispatch_loop(stop, wake))

    async def _follow_loop(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                queued = await asyncio.to_thread(self.follow_until_caught_up)
            except _STORAGE_ERRORS as exc:
                log.warning("outbox follower: %r; trying again", exc)
                queued = 0
            if queued:
                wake.set()
            await _wait_any((stop,), self.poll_interval)
        wake.set()

    async def _dispatch_loop(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        while not stop.is_set():
            wake.clear()
            busy = False
            try:
                attempted, held = await self.dispatch_once()
                busy = attempted + held > 0  # the next replies may be due at once
                await self.report_once()
            except _STORAGE_ERRORS as exc:
                log.warning("delivery dispatcher: %r; trying again", exc)
            if not busy:
                await _wait_any((stop, wake), self.poll_interval)


def _reason(exc: BaseException) -> str:
    # (a service's error text goes into a text column and an event: no NUL, which
    # PostgreSQL's text cannot hold and the contact-event gate refuses)
    return (str(exc) or type(exc).__name__).replace("\x00", "")


async def _wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:  # noqa: ASYNC109
    """Returns when one of `events` is set or after `timeout` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


__all__ = [
    "FAILED",
    "HELD",
    "PENDING",
    "SENT",
    "DeliveryService",
    "OutboxEntry",
    "Recipient",
    "RoundResult",
    "Undeliverable",
    "build_message",
    "customer_ref",
    "ensure_outbox_tables",
    "outbox_position",
    "outbox_status",
    "recipient_for",
]
