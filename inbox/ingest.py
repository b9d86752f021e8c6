"""Ingest: contact events -> customer -> conversation -> domain events, a batch at a time.

A batch's domain events, the ids of the contact events it took in and its Kafka position are
recorded in one transaction (`EventStorePort.record`), so every record takes effect exactly
once. Aggregates stay in an in-memory cache between batches; when another writer changed one
of them first, the store refuses the batch (IntegrityError), the batch's aggregates are
dropped from the cache and the batch is decided again from fresh state.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any
from uuid import UUID

from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.utils import get_topic

from inbox import telemetry, thread_tokens
from inbox.contact import ContactEvent
from inbox.domain import ids
from inbox.domain.conversation import RESOLVED, Conversation
from inbox.domain.customer import Customer, IdentityClaim
from inbox.domain.time import iso, parse_iso
from inbox.ports import ContactEventSource, EventStorePort

log = logging.getLogger(__name__)

# A customer writing again within this long after a resolution reopens the conversation;
# later, they start a new one (the old one stays reachable as `previous`).
REOPEN_WINDOW = timedelta(days=7)
# Events about an existing exchange never open a conversation of their own.
_FOLLOW_UP_TYPES = frozenset({"delivery.status", "csat.submitted"})
_AUTOMATIC_MARKER = "auto_submitted"


class AggregateCache:
    """Aggregates by id, bounded so the worker's memory is too: the oldest entries go first
    (cheaper than LRU bookkeeping on every hit; an evicted aggregate is just read again).

    Keyed by the id's integer: a UUID hashes in Python code, an int in C, and the worker
    looks up a few aggregates per contact event."""

    def __init__(self, limit: int = 100_000) -> None:
        self._items: dict[int, Any] = {}
        self._limit = limit

    def get(self, key: UUID) -> Any:
        return self._items.get(key.int)

    def put(self, key: UUID, aggregate: Any) -> None:
        self.put_all([(key.int, aggregate)])

    def put_all(self, items: Iterable[tuple[int, Any]]) -> None:
        self._items.update(items)
        if len(self._items) > self._limit:
            for old in list(itertools.islice(self._items, len(self._items) - self._limit)):
                del self._items[old]

    def discard(self, keys: Sequence[UUID]) -> None:
        self.discard_ints([key.int for key in keys])

    def discard_ints(self, keys: Iterable[int]) -> None:
        for key in keys:
            self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class _UnitOfWork:
    """The aggregates one batch touched and the events they recorded, in order. Keyed by the
    ids' integers, as the cache is."""

    __slots__ = ("_recent", "absent", "cache", "cached", "events", "store", "touched")

    def __init__(self, store: EventStorePort, cache: AggregateCache) -> None:
        self.store = store
        self.cache = cache
        # Ids known to have no events yet: looked up for the whole batch in one query.
        self.absent: set[int] = set()
        self.touched: dict[int, Any] = {}
        self.cached: set[int] = set()
        self.events: list[CanMutateAggregate[UUID]] = []
        self._recent: list[Any] = []

    def get(self, aggregate_id: UUID) -> Any:
        key = aggregate_id.int
        aggregate = self.touched.get(key)
        if aggregate is None:
            aggregate = self.cache._items.get(key)
            if aggregate is not None:
                self.cached.add(key)
            elif key not in self.absent:
                aggregate = self.store.get(aggregate_id)
            if aggregate is not None:
                self.touched[key] = aggregate
        if aggregate is not None:
            self._recent.append(aggregate)
        return aggregate

    def add(self, aggregate: Any) -> Any:
        key = aggregate.id.int
        self.touched[key] = aggregate
        self.absent.discard(key)
        self._recent.append(aggregate)
        return aggregate

    def collect(self) -> None:
        """Moves the events of the aggregates used since the last call, in trigger order
        per aggregate and in first-use order across them."""
        events = self.events
        for aggregate in self._recent:
            pending = aggregate._pending_events
            if pending:
                events.extend(pending)
                pending.clear()
        self._recent.clear()


@dataclass(frozen=True)
class BatchOutcome:
    stored: int  # contact events that took effect
    duplicates: int  # contact events already taken in earlier (same event_id)
    domain_events: int
    notification_ids: Sequence[int]
    skipped: bool = False  # the batch's position was already recorded by another worker


# Events that other writers (agents merging customers) record on aggregates the worker only
# reads: seeing one in the log drops that aggregate from the cache. Aggregates the worker
# writes need no such care: a stale copy's write is refused by the store and retried.
_CHANGED_ELSEWHERE = tuple(
    get_topic(cls)
    for cls in (
        IdentityClaim.Reassigned,
        Customer.Merged,
        Customer.MergedInto,
        Customer.MergeUndone,
        Customer.Restored,
    )
)


class Ingestor:
    def __init__(self, store: EventStorePort, *, cache: AggregateCache | None = None) -> None:
        self.store = store
        # (An empty cache is falsy: `cache or ...` would drop the one given.)
        self.cache = cache if cache is not None else AggregateCache()
        self._log_seen: int | None = None

    def _forget_changed_elsewhere(self) -> None:
        head = self.store.max_notification_id()
        if self._log_seen is not None and len(self.cache):
            after = self._log_seen
            while changed := self.store.notifications(after, 1000, topics=_CHANGED_ELSEWHERE):
                self.cache.discard([UUID(str(n.originator_id)) for n in changed])
                after = changed[-1].id
        self._log_seen = head

    def apply_batch(
        self,
        batch: Sequence[tuple[ContactEvent, ContactEventSource]],
        tracking: Tracking,
        *,
        attempts: int = 5,
    ) -> BatchOutcome:
        """Applies one partition's batch and records it with its position."""
        return self.apply_poll([(tracking, batch)], attempts=attempts)

    def apply_poll(
        self,
        parts: Sequence[tuple[Tracking, Sequence[tuple[ContactEvent, ContactEventSource]]]],
        *,
        attempts: int = 5,
    ) -> BatchOutcome:
        """Applies the batches of several partitions (one Kafka poll) and records them with
        each one's position, in one transaction: one commit instead of one per partition, and
        pages the partitions share are written once. A part whose position another worker
        has already recorded is left out; retries on write conflicts."""
        for attempt in range(1, attempts + 1):
            todo = [(t, b) for t, b in parts if not self._recorded(t)]
            if not todo:
                return BatchOutcome(0, 0, 0, (), skipped=True)
            self._forget_changed_elsewhere()
            uow = _UnitOfWork(self.store, self.cache)
            try:
                outcome = self._apply(
                    uow, [entry for _, b in todo for entry in b], [t for t, _ in todo]
                )
            except IntegrityError:
                self.cache.discard_ints(list(uow.touched))
                telemetry.WRITE_CONFLICTS.inc()
                names = ", ".join(t.application_name for t, _ in todo)
                log.info("write conflict on %s, attempt %d", names, attempt)
                continue
            except BaseException:
                # Cached aggregates were changed in place by a batch that did not land.
                self.cache.discard_ints(list(uow.touched))
                raise
            cached = uow.cached
            self.cache.put_all(
                (key, aggregate) for key, aggregate in uow.touched.items() if key not in cached
            )
            return outcome
        names = ", ".join(t.application_name for t, _ in parts)
        raise IntegrityError(f"{names}: {attempts} write conflicts in a row")

    def _recorded(self, tracking: Tracking) -> bool:
        done = self.store.position(tracking.application_name)
        return done is not None and done >= tracking.notification_id

    def _apply(
        self,
        uow: _UnitOfWork,
        batch: Sequence[tuple[ContactEvent, ContactEventSource]],
        trackings: Sequence[Tracking],
    ) -> BatchOutcome:
        seen = self.store.seen_event_ids([event.event_id for event, _ in batch])
        fresh: list[tuple[ContactEvent, list[str], list[UUID]]] = []
        sources: list[ContactEventSource] = []
        claim_ids: set[UUID] = set()
        for event, source in batch:
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            keys = event.identity_keys()
            claims = [ids.claim_id(key) for key in keys]
            claim_ids.update(claims)
            fresh.append((event, keys, claims))
            sources.append(source)
        cached = self.cache._items
        unknown = [i for i in claim_ids if i.int not in cached]
        uow.absent.update(i.int for i in set(unknown) - self.store.existing_ids(unknown))
        for event, keys, claims in fresh:
            apply_contact_event(uow, event, keys, claims)
            uow.collect()
        notification_ids = self.store.record(
            uow.events,
            trackings=trackings,
            contact_events=sources,
            aggregates=uow.touched.values(),
        )
        return BatchOutcome(
            stored=len(sources),
            duplicates=len(batch) - len(sources),
            domain_events=len(uow.events),
            notification_ids=notification_ids,
        )


@lru_cache(maxsize=200_000)
def _uuid(text: str) -> UUID:
    return UUID(text)


def apply_contact_event(
    uow: _UnitOfWork,
    event: ContactEvent,
    keys: list[str] | None = None,
    claim_ids: list[UUID] | None = None,
) -> None:
    """The decisions for one contact event: who it is from and which conversation it joins.
    `keys` and `claim_ids`: the event's identity keys and their claims' ids, when known."""
    if keys is None:
        keys = event.identity_keys()
    if claim_ids is None:
        claim_ids = [ids.claim_id(key) for key in keys]
    at = iso(event.occurred_at)
    customer = _resolve_customer(uow, event, keys, claim_ids, at)
    conversation = _current_conversation(uow, customer, event, at)
    _record(conversation, event, at)


def _resolve_customer(
    uow: _UnitOfWork, event: ContactEvent, keys: list[str], claim_ids: list[UUID], at: str
) -> Customer:
    claims: list[IdentityClaim | None] = [uow.get(claim_id) for claim_id in claim_ids]
    owner: str | None = None
    unclaimed = False
    for claim in claims:
        if claim is None:
            unclaimed = True
        elif owner is None:
            owner = claim.customer_id
    customer: Customer | None = None
    if owner is not None:
        customer = uow.get(_uuid(owner))
        # A claim always points at the surviving customer, but follow a merge regardless.
        while customer is not None and customer.merged_into is not None:
            customer = uow.get(_uuid(customer.merged_into))
    if customer is None:
        customer = uow.add(Customer.register(keys, event.customer.name, at))
    if unclaimed:
        _claim_new_identities(uow, customer, event, keys, claims, at)
    customer.learn_name(event.customer.name, at)
    return customer


def _claim_new_identities(
    uow: _UnitOfWork,
    customer: Customer,
    event: ContactEvent,
    keys: list[str],
    claims: list[IdentityClaim | None],
    at: str,
) -> None:
    customer_id = str(customer.id)
    known = [key for key, claim in zip(keys, claims, strict=True) if claim is not None]
    # Linked only on an exact match of normalised identities in one contact event.
    reason = f"came with {known[0]} in contact event {event.event_id}" if known else ""
    for key, claim in zip(keys, claims, strict=True):
        if claim is None:
            uow.add(IdentityClaim.claim(key, customer_id, at))
            customer.add_identity(key, at, reason=reason or f"contact event {event.event_id}")
        # An identity that already belongs to another customer stays theirs: joining two
        # customers is an agent's decision (merge), never a guess.


def _current_conversation(
    uow: _UnitOfWork, customer: Customer, event: ContactEvent, at: str
) -> Conversation:
    thread = event.thread
    if thread.in_reply_to or thread.ref:
        threaded = _threaded_conversation(uow, customer, event)
        if threaded is not None:
            return threaded
    current_id = customer.current_conversation_id
    conversation: Conversation | None = None
    if current_id is not None:
        conversation = uow.get(_uuid(current_id))
    if conversation is not None and not _starts_new_conversation(conversation, event):
        return conversation
    opened: Conversation = uow.add(
        Conversation.open(
            customer_id=str(customer.id),
            channel=event.channel,
            queue=None,
            previous=current_id,
            source_event_id=event.event_id,
            at=at,
        )
    )
    customer.start_conversation(opened.id, at)
    return opened


def _threaded_conversation(
    uow: _UnitOfWork, customer: Customer, event: ContactEvent
) -> Conversation | None:
    """The conversation a reply names: by In-Reply-To, then References (newest first), then
    the reply token. Only one of this customer's own conversations: a token never lets one
    customer write into another's."""
    candidates = [thread_tokens.from_message_id(ref) for ref in event.thread.in_reply_to]
    if event.thread.ref:
        candidates.append(thread_tokens.from_token(event.thread.ref))
    own = set(customer.conversations)
    for candidate in candidates:
        if candidate is not None and str(candidate) in own:
            conversation: Conversation | None = uow.get(candidate)
            if conversation is not None:
                return conversation
    return None


def _starts_new_conversation(conversation: Conversation, event: ContactEvent) -> bool:
    if conversation.status != RESOLVED or event.type in _FOLLOW_UP_TYPES:
        return False
    if event.payload.get(_AUTOMATIC_MARKER):
        return False  # an auto-reply changes no state, so it starts nothing either
    if conversation.resolved_at is None:
        return False
    return event.occurred_at - parse_iso(conversation.resolved_at) > REOPEN_WINDOW


def _record(conversation: Conversation, event: ContactEvent, at: str) -> None:
    payload = event.payload
    if event.type == "message.received":
        conversation.receive_message(
            channel=event.channel,
            via=_str_or_none(payload.get("via")),
            message_id=_str_or_none(payload.get("message_id")),
            text=str(payload.get("text") or ""),
            subject=_str_or_none(payload.get("subject")),
            html=_str_or_none(payload.get("html")),
            attachments=list(payload.get("attachments") or []),
            thread_ref=event.thread.ref,
            in_reply_to=list(event.thread.in_reply_to),
            automatic=bool(payload.get(_AUTOMATIC_MARKER, False)),
            source_event_id=event.event_id,
            at=at,
        )
    elif event.type == "delivery.status":
        conversation.record_delivery(
            channel=event.channel,
            message_id=str(payload["message_id"]),
            provider_id=_str_or_none(payload.get("provider_id")),
            status=str(payload["status"]),
            error=_str_or_none(payload.get("error")),
            source_event_id=event.event_id,
            at=at,
        )
    elif event.type == "csat.submitted":
        conversation.record_csat(
            channel=event.channel,
            score=int(payload["score"]),
            comment=_str_or_none(payload.get("comment")),
            source_event_id=event.event_id,
            at=at,
        )
    else:
        conversation.record_activity(
            event.type,
            channel=event.channel,
            data=dict(payload),
            source_event_id=event.event_id,
            at=at,
        )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
