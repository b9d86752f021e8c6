"""Erasing a customer's personal data on request (`inbox forget --customer ID`), keeping the
history replayable.

The events stay, with their types, versions, times, actors and ids; what identifies or
describes the person is rewritten in place: message texts, subjects, HTML, notes and replies
about them, survey comments, callback numbers, names, and attachment files. Identity keys
(`email:...`, `phone:...`) become pseudonyms (`forgotten:<hash with a salt kept nowhere>`): the
same key gets the same pseudonym within one erasure, so merges, claims and the projections
still replay to the same shape, and nobody can recompute the original. Then a
`Customer.Forgotten` event records that it was done, by whom and when; the projections erase
what they show when it reaches them.

Not in our hands: the contact events still in the Kafka topic (they expire with its
retention) and copies elsewhere (backups, a replying agent's mailbox).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from adapters.attachments import AttachmentStore, UnknownAttachment
from inbox.delivery import OUTBOX_TABLE, ensure_outbox_tables
from inbox.domain import ids
from inbox.domain.customer import Customer
from inbox.domain.time import Clock, iso, system_clock
from infra.store import EventStore
from projections.db import ReadModelDB

REDACTED = "[forgotten]"
# Free text about the person, anywhere in an event's state (or its `data`).
_TEXT_FIELDS = ("text", "subject", "html", "comment", "error", "name", "number", "thread_ref")
# Fields holding identity keys (a string, or a list of them).
_IDENTITY_FIELDS = ("identities", "identity", "key")


@dataclass(frozen=True)
class Erasure:
    customer_id: str
    aggregates: int
    events_rewritten: int
    attachments_deleted: int
    conversations: list[str]


class _Redactor:
    def __init__(self, attachments: AttachmentStore | None) -> None:
        self.salt = secrets.token_bytes(16)
        self.attachments = attachments
        self.refs: set[str] = set()

    def pseudonym(self, key: str) -> str:
        if key.startswith("forgotten:"):
            return key
        return "forgotten:" + hashlib.sha256(self.salt + key.encode()).hexdigest()[:20]

    def __call__(self, state: dict[str, Any]) -> bool:
        before = repr(state)
        self._redact(state)
        data = state.get("data")
        if isinstance(data, dict):
            self._redact(data)
        return repr(state) != before

    def _redact(self, state: dict[str, Any]) -> None:
        for name in _TEXT_FIELDS:
            if isinstance(state.get(name), str) and state[name]:
                state[name] = REDACTED
        for name in _IDENTITY_FIELDS:
            value = state.get(name)
            if isinstance(value, str):
                state[name] = self.pseudonym(value)
            elif isinstance(value, list):
                state[name] = [self.pseudonym(v) if isinstance(v, str) else v for v in value]
        if isinstance(state.get("in_reply_to"), list):
            state["in_reply_to"] = []
        attachments = state.get("attachments")
        if isinstance(attachments, list) and attachments:
            for attachment in attachments:
                if isinstance(attachment, dict) and isinstance(attachment.get("ref"), str):
                    self.refs.add(attachment["ref"])
            state["attachments"] = [
                {"name": REDACTED, "type": a.get("type"), "size": a.get("size"), "ref": None}
                for a in attachments
                if isinstance(a, dict)
            ]

    def delete_files(self) -> int:
        deleted = 0
        if self.attachments is None:
            return 0
        for ref in sorted(self.refs):
            try:
                path = self.attachments.path(ref)
            except UnknownAttachment:
                continue
            if path.exists():
                path.unlink()
                deleted += 1
        return deleted


def _customers(store: EventStore, customer: Customer) -> list[Customer]:
    """The customer and every customer merged into it (their events name the same person)."""
    found = [customer]
    for other_id in customer.absorbed:
        other = store.get(UUID(other_id))
        if isinstance(other, Customer):
            found.extend(_customers(store, other))
    return found


def forget_customer(
    store: EventStore,
    customer_id: UUID,
    *,
    actor: str,
    data_dir: Path | None = None,
    read_models: ReadModelDB | None = None,
    clock: Clock = system_clock,
    on_progress: Callable[[str], None] = lambda _: None,
) -> Erasure:
    """Erases the personal data of a customer (and of those merged into it); records it."""
    customer = store.get(customer_id)
    if not isinstance(customer, Customer):
        raise LookupError(f"no customer {customer_id}")
    redact = _Redactor(AttachmentStore(data_dir) if data_dir is not None else None)
    people = _customers(store, customer)
    aggregates: list[UUID] = []
    conversations: list[str] = []
    for person in people:
        aggregates.append(person.id)
        aggregates.extend(ids.claim_id(key) for key in person.identities)
        for conversation in person.conversations:
            if conversation not in conversations:
                conversations.append(conversation)
    aggregates.extend(UUID(c) for c in conversations)
    rewritten = 0
    for aggregate_id in dict.fromkeys(aggregates):
        rewritten += store.rewrite(aggregate_id, redact)
        on_progress(str(aggregate_id))
    # Rebuilt from the rewritten events, then the record that it happened.
    erased = store.get(customer_id)
    assert isinstance(erased, Customer)
    erased.trigger_event(
        Customer.Forgotten,
        identities=list(erased.identities),
        conversations=conversations,
        actor=actor,
        at=iso(clock()),
    )
    store.save(erased)
    if read_models is not None and conversations:
        # replies waiting in (or sent through) the outbox carry their text
        ensure_outbox_tables(read_models)
        with read_models.transaction() as tx:
            marks = ",".join("?" * len(conversations))
            tx.execute(
                f"UPDATE {OUTBOX_TABLE} SET text=? WHERE conversation_id IN ({marks})",
                (REDACTED, *conversations),
            )
    return Erasure(
        customer_id=str(customer_id),
        aggregates=len(set(aggregates)),
        events_rewritten=rewritten,
        attachments_deleted=redact.delete_files(),
        conversations=conversations,
    )
