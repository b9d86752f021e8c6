"""Commands from agents and admins: load the aggregates, decide, record. Each records its
actor; a refusal by the domain raises a DomainError (the API answers 409) and records nothing.

Concurrency is optimistic: two commands (or a command and the ingest worker) changing the same
aggregate at once cannot both land; the loser is decided again from fresh state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from inbox.domain import ids
from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer, IdentityClaim
from inbox.domain.errors import ConversationStateError, CustomerMergeError
from inbox.domain.time import Clock, iso, system_clock
from inbox.ports import EventStorePort

T = TypeVar("T")
# (channel, conversation id, survey message id) -> the survey's text, None: send none
SurveyText = Callable[[str, str, str], str | None]
_ATTEMPTS = 5


def retrying(decide: Callable[[], T]) -> T:
    """Runs `decide` (load, decide, save) again when another writer changed the aggregate
    first (IntegrityError), up to a few times; the last attempt's error goes to the caller."""
    for _ in range(_ATTEMPTS - 1):
        try:
            return decide()
        except IntegrityError:
            continue  # someone else changed it first: decide again on fresh state
    return decide()


class NotFound(LookupError):
    """No aggregate with that id (the API answers 404)."""


class Commands:
    def __init__(
        self,
        store: EventStorePort,
        *,
        clock: Clock = system_clock,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        survey_text: SurveyText = lambda channel, conversation, message: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.new_id = new_id
        self.survey_text = survey_text

    def _retrying(self, decide: Callable[[], T]) -> T:
        return retrying(decide)

    def _conversation(self, conversation_id: UUID) -> Conversation:
        conversation = self.store.get(conversation_id)
        if not isinstance(conversation, Conversation):
            raise NotFound(f"no conversation {conversation_id}")
        return conversation

    def _customer(self, customer_id: UUID) -> Customer:
        customer = self.store.get(customer_id)
        if not isinstance(customer, Customer):
            raise NotFound(f"no customer {customer_id}")
        return customer

    def _on_conversation(
        self, conversation_id: UUID, act: Callable[[Conversation, str], Any]
    ) -> Conversation:
        def decide() -> Conversation:
            conversation = self._conversation(conversation_id)
            act(conversation, iso(self.clock()))
            self.store.save(conversation)
            return conversation

        return self._retrying(decide)

    # -- conversations ---------------------------------------------------------------------

    def add_note(self, conversation_id: UUID, text: str, *, actor: str) -> Conversation:
        return self._on_conversation(
            conversation_id, lambda c, at: c.add_note(text, actor=actor, at=at)
        )

    def assign(
        self, conversation_id: UUID, agent: str | None, *, actor: str, claim: bool = False
    ) -> Conversation:
        return self._on_conversation(
            conversation_id, lambda c, at: c.assign(agent, actor=actor, at=at, claim=claim)
        )

    def accept_offer(self, conversation_id: UUID, agent: str) -> Conversation:
        """The agent takes what the router offered them; a conversation someone else got
        first is refused (409)."""

        def act(c: Conversation, at: str) -> None:
            if c.offered_to != agent and c.assignee is None:
                raise ConversationStateError(f"no offer to {agent} is outstanding")
            c.assign(agent, actor=agent, at=at, claim=True)

        return self._on_conversation(conversation_id, act)

    def decline_offer(self, conversation_id: UUID, agent: str) -> Conversation:
        return self._on_conversation(
            conversation_id,
            lambda c, at: c.lapse_offer(agent, reason="declined", actor=agent, at=at),
        )

    def set_vip(self, customer_id: UUID, vip: bool, *, actor: str) -> Customer:
        def decide() -> Customer:
            customer = self._customer(customer_id)
            customer.set_vip(vip, actor=actor, at=iso(self.clock()))
            self.store.save(customer)
            return customer

        return self._retrying(decide)

    def transfer(self, conversation_id: UUID, queue: str, *, actor: str) -> Conversation:
        return self._on_conversation(
            conversation_id, lambda c, at: c.transfer(queue, actor=actor, at=at)
        )

    def escalate(self, conversation_id: UUID, reason: str, *, actor: str) -> Conversation:
        return self._on_conversation(
            conversation_id, lambda c, at: c.escalate(reason, actor=actor, at=at)
        )

    def resolve(self, conversation_id: UUID, *, actor: str) -> Conversation:
        """Resolves, and queues the satisfaction survey through the customer's last channel
        in the same save (a conversation that only ever called gets none: no text channel)."""
        message_id = self.new_id()

        def act(c: Conversation, at: str) -> None:
            c.resolve(actor=actor, at=at)
            channel = c.last_inbound_channel or c.channel
            text = self.survey_text(channel, str(c.id), message_id)
            if text is not None:
                c.queue_survey(message_id, channel, text, actor=actor, at=at)

        return self._on_conversation(conversation_id, act)

    def reopen(self, conversation_id: UUID, *, actor: str) -> Conversation:
        return self._on_conversation(conversation_id, lambda c, at: c.reopen(actor=actor, at=at))

    def mark_pending(self, conversation_id: UUID, *, actor: str) -> Conversation:
        return self._on_conversation(
            conversation_id, lambda c, at: c.mark_pending(actor=actor, at=at)
        )

    def reply(
        self, conversation_id: UUID, text: str, *, channel: str | None, actor: str
    ) -> tuple[Conversation, str]:
        """Queues a reply through `channel` or the channel of the last inbound message; the
        delivery process sends it. Returns the conversation and the reply's message id."""
        message_id = self.new_id()

        def act(conversation: Conversation, at: str) -> None:
            through = channel or conversation.last_message_channel
            if through is None:
                raise ConversationStateError(
                    "the customer has only called in this conversation: name the channel "
                    "to reply through"
                )
            conversation.queue_reply(message_id, through, text, actor=actor, at=at)

        return self._on_conversation(conversation_id, act), message_id

    # -- customers -------------------------------------------------------------------------

    def merge(self, survivor_id: UUID, other_id: UUID, *, actor: str) -> Customer:
        """`other` joins `survivor`: identities, conversations and future contacts."""

        def decide() -> Customer:
            survivor, other = self._customer(survivor_id), self._customer(other_id)
            at = iso(self.clock())
            survivor.absorb(other, actor=actor, at=at)
            claims = self._claims(other.identities)
            for claim in claims:
                claim.reassign(
                    str(survivor.id), reason=f"merged into {survivor.id}", actor=actor, at=at
                )
            self.store.save(survivor, other, *claims)
            return survivor

        return self._retrying(decide)

    def unmerge(self, customer_id: UUID, identity: str, *, actor: str) -> Customer:
        """Undoes the merge that brought `identity`: that customer is separate again."""

        def decide() -> Customer:
            survivor = self._customer(customer_id)
            source = survivor.absorbed_from(identity)
            if source is None:
                raise CustomerMergeError(f"{identity} did not come from a merge into this customer")
            other = self._customer(UUID(source))
            at = iso(self.clock())
            moved = survivor.undo_merge(other, actor=actor, at=at)
            claims = self._claims(moved)
            for claim in claims:
                claim.reassign(
                    str(other.id), reason=f"merge into {survivor.id} undone", actor=actor, at=at
                )
            self.store.save(survivor, other, *claims)
            return other

        return self._retrying(decide)

    def _claims(self, identities: list[str]) -> list[IdentityClaim]:
        claims = []
        for key in identities:
            claim = self.store.get(ids.claim_id(key))
            if isinstance(claim, IdentityClaim):
                claims.append(claim)
        return claims


__all__ = ["Commands", "ConversationStateError", "NotFound"]
