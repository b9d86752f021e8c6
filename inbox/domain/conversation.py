"""The conversation: one per customer at a time, across every channel.

States: open -> pending -> resolved. A customer writing to a pending conversation opens it
again; writing to a resolved one reopens it (within the reopen window, decided by the
application). Auto-replies and bounces are recorded but change no state.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from inbox.domain import ids
from inbox.domain.base import DomainAggregate
from inbox.domain.errors import ConversationStateError

OPEN, PENDING, RESOLVED = "open", "pending", "resolved"
CUSTOMER = "customer"
ROUTER = "router"
# Priorities go from 0 (normal) to this; a higher one is served first.
MAX_PRIORITY = 9


def is_priority(value: object) -> bool:
    """A whole number from 0 to MAX_PRIORITY (not a bool, which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PRIORITY


def _check_priority(priority: int) -> None:
    if not is_priority(priority):
        raise ConversationStateError(f"priority must be a whole number from 0 to {MAX_PRIORITY}")


def _survey_score(text: str) -> int | None:
    """A survey answer is a lone digit 1-5 ("4", " 5 ", "3."); anything else is a message."""
    stripped = text.strip().rstrip(".!")
    if len(stripped) == 1 and stripped in "12345":
        return int(stripped)
    return None


class Conversation(DomainAggregate):
    class Opened(Aggregate.Created):
        class_version = 1
        customer_id: str
        channel: str
        queue: str | None
        previous: str | None
        source_event_id: str | None
        at: str

    class MessageReceived(Aggregate.Event):
        """`via` is our account the customer wrote to (an email address, a Twilio number, a
        WhatsApp phone_number_id, a page id): replies go out from it."""

        class_version = 2
        channel: str
        via: str | None
        message_id: str | None
        text: str
        subject: str | None
        html: str | None
        attachments: list[dict[str, Any]]
        thread_ref: str | None
        in_reply_to: list[str]
        automatic: bool
        source_event_id: str
        at: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["via"] = None

        def apply(self, aggregate: Any) -> None:
            if not self.automatic:
                aggregate.inbound_count += 1
                aggregate.last_inbound_channel = self.channel
                if self.channel != "voice":  # (a voicemail: no reply goes through a call)
                    aggregate.last_message_channel = self.channel
                if aggregate.status == PENDING:
                    aggregate.status = OPEN
                if aggregate.waiting_since is None:
                    aggregate.waiting_since = self.at

    class ActivityRecorded(Aggregate.Event):
        """A call leg, IVR step, callback request or chat start/end, as the channel saw it."""

        class_version = 1
        activity: str
        channel: str
        data: dict[str, Any]
        source_event_id: str
        at: str

        def apply(self, aggregate: Any) -> None:
            if self.activity in ("call.started", "chat.started"):
                aggregate.inbound_count += 1
                aggregate.last_inbound_channel = self.channel
                if self.activity == "chat.started":
                    aggregate.last_message_channel = self.channel
                if aggregate.status == PENDING:
                    aggregate.status = OPEN
                if aggregate.waiting_since is None:
                    aggregate.waiting_since = self.at
            elif self.activity == "call.answered":
                aggregate.waiting_since = None

    class DeliveryStatusRecorded(Aggregate.Event):
        """`message_id` is ours (ReplyQueued.message_id); `provider_id` the channel's own id
        for it, learnt from our `sent` status, so the channel's later receipts find it."""

        class_version = 2
        channel: str
        message_id: str
        provider_id: str | None
        status: str
        error: str | None
        source_event_id: str
        at: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["provider_id"] = None

        def apply(self, aggregate: Any) -> None:
            if self.provider_id:
                aggregate.provider_ids[self.provider_id] = self.message_id

    class CsatSubmitted(Aggregate.Event):
        class_version = 1
        channel: str
        score: int
        comment: str | None
        source_event_id: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.survey_pending = False

    class NoteAdded(Aggregate.Event):
        class_version = 1
        text: str
        actor: str
        at: str

    class ReplyQueued(Aggregate.Event):
        class_version = 1
        message_id: str
        channel: str
        text: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.waiting_since = None
            if aggregate.first_response_at is None:
                aggregate.first_response_at = self.at

    class SurveyQueued(Aggregate.Event):
        """The satisfaction survey sent after a resolution; the delivery process sends it
        like a reply. A 1-5 answer to it becomes CsatSubmitted, not a new contact."""

        class_version = 1
        message_id: str
        channel: str
        text: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.survey_pending = True

    class Queued(Aggregate.Event):
        """Entered a queue: `reason` says how (entry point, keyword rule, IVR, default)."""

        class_version = 1
        queue: str
        priority: int
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.queue = self.queue
            aggregate.priority = self.priority

    class PriorityChanged(Aggregate.Event):
        class_version = 1
        priority: int
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.priority = self.priority

    class Offered(Aggregate.Event):
        """The router offered the conversation to an agent; `expires_at` None: no timeout."""

        class_version = 1
        agent: str
        expires_at: str | None
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.offered_to = self.agent

    class OfferLapsed(Aggregate.Event):
        """Not accepted in time, or withdrawn (the agent went away)."""

        class_version = 1
        agent: str
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.offered_to = None

    class Assigned(Aggregate.Event):
        class_version = 1
        agent: str | None
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.assignee = self.agent
            aggregate.offered_to = None

    class SlaWarned(Aggregate.Event):
        """`kind`: first_response, next_response or resolution; `due_at` of that target."""

        class_version = 1
        kind: str
        due_at: str
        actor: str
        at: str

    class SlaBreached(Aggregate.Event):
        class_version = 1
        kind: str
        due_at: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.breaches.append(self.kind)

    class Transferred(Aggregate.Event):
        class_version = 1
        queue: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.queue = self.queue
            aggregate.assignee = None
            aggregate.offered_to = None

    class Escalated(Aggregate.Event):
        class_version = 1
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.escalated = True

    class MarkedPending(Aggregate.Event):
        class_version = 1
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = PENDING

    class Resolved(Aggregate.Event):
        class_version = 1
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = RESOLVED
            aggregate.resolved_at = self.at
            aggregate.waiting_since = None
            aggregate.offered_to = None

    class Reopened(Aggregate.Event):
        class_version = 1
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = OPEN
            aggregate.resolved_at = None
            aggregate.reopen_count += 1
            # SLA clocks and the first-response KPI measure from the reopen
            aggregate.cycle_started_at = self.at
            aggregate.first_response_at = None
            aggregate.escalated = False
            aggregate.breaches = []
            aggregate.survey_pending = False

    @staticmethod
    def create_id(customer_id: str, source_event_id: str | None) -> UUID:
        if source_event_id is None:
            raise ValueError("a conversation is named after the event that opened it")
        return ids.conversation_id(customer_id, source_event_id)

    @classmethod
    def open(
        cls,
        *,
        customer_id: str,
        channel: str,
        queue: str | None,
        previous: str | None,
        source_event_id: str,
        at: str,
    ) -> Conversation:
        """`Conversation(...)` without the metaclass's generic argument handling."""
        return cls._create(
            cls.Opened,
            id=ids.conversation_id(customer_id, source_event_id),
            customer_id=customer_id,
            channel=channel,
            queue=queue,
            previous=previous,
            source_event_id=source_event_id,
            at=at,
        )

    def __init__(
        self,
        customer_id: str,
        channel: str,
        queue: str | None,
        previous: str | None,
        source_event_id: str | None,
        at: str,
    ) -> None:
        self.customer_id = customer_id
        self.channel = channel
        self.queue = queue
        self.priority = 0
        self.status = OPEN
        self.assignee: str | None = None
        self.offered_to: str | None = None
        self.cycle_started_at = at
        self.first_response_at: str | None = None
        self.breaches: list[str] = []
        self.survey_pending = False
        self.escalated = False
        self.resolved_at: str | None = None
        self.waiting_since: str | None = None
        self.last_inbound_channel: str | None = None
        # the channel the customer last wrote on (a call is not one a reply can go through)
        self.last_message_channel: str | None = None
        self.inbound_count = 0
        self.reopen_count = 0
        # the channel's message id -> ours, for receipts that only know the former
        self.provider_ids: dict[str, str] = {}

    # -- what the customer did (from contact events) --------------------------------------

    def receive_message(self, *, automatic: bool, at: str, **fields: Any) -> None:
        # email answers the survey by its links, so a digit in an email is a message
        pending = self.survey_pending and fields.get("channel") != "email"
        score = _survey_score(fields.get("text", "")) if pending else None
        if score is not None and not automatic:
            self.trigger_event(
                self.CsatSubmitted,
                channel=fields["channel"],
                score=score,
                comment=None,
                source_event_id=fields["source_event_id"],
                at=at,
            )
            return
        if self.status == RESOLVED and not automatic:
            self.trigger_event(self.Reopened, reason="customer wrote again", actor=CUSTOMER, at=at)
        self.trigger_event(self.MessageReceived, automatic=automatic, at=at, **fields)

    def record_activity(self, activity: str, *, at: str, **fields: Any) -> None:
        if self.status == RESOLVED and activity in ("call.started", "chat.started"):
            self.trigger_event(self.Reopened, reason=f"customer {activity}", actor=CUSTOMER, at=at)
        self.trigger_event(self.ActivityRecorded, activity=activity, at=at, **fields)

    def record_delivery(
        self, *, message_id: str, provider_id: str | None = None, **fields: Any
    ) -> None:
        """A receipt under the channel's id is recorded under ours when we know the pair."""
        ours = self.provider_ids.get(message_id, message_id)
        if provider_id is None and ours != message_id:
            provider_id = message_id
        self.trigger_event(
            self.DeliveryStatusRecorded, message_id=ours, provider_id=provider_id, **fields
        )

    def record_csat(self, **fields: Any) -> None:
        self.trigger_event(self.CsatSubmitted, **fields)

    # -- what agents do (commands) --------------------------------------------------------

    def add_note(self, text: str, *, actor: str, at: str) -> None:
        if not text.strip():
            raise ConversationStateError("a note needs text")
        self.trigger_event(self.NoteAdded, text=text, actor=actor, at=at)

    def queue_reply(self, message_id: str, channel: str, text: str, *, actor: str, at: str) -> None:
        if not text.strip():
            raise ConversationStateError("a reply needs text")
        self.trigger_event(
            self.ReplyQueued, message_id=message_id, channel=channel, text=text, actor=actor, at=at
        )

    def assign(self, agent: str | None, *, actor: str, at: str, claim: bool = False) -> None:
        """`claim`: an agent taking the conversation for themselves (or accepting an offer),
        refused when someone else has it; supervisors assign without claiming."""
        if self.status == RESOLVED:
            raise ConversationStateError("a resolved conversation cannot be assigned")
        if agent == self.assignee:
            raise ConversationStateError(f"already assigned to {agent}")
        if claim and self.assignee is not None:
            raise ConversationStateError(f"already assigned to {self.assignee}")
        self.trigger_event(self.Assigned, agent=agent, actor=actor, at=at)

    def enter_queue(self, queue: str, priority: int, *, reason: str, actor: str, at: str) -> None:
        _check_priority(priority)
        if self.status == RESOLVED:
            raise ConversationStateError("a resolved conversation waits in no queue")
        if queue == self.queue and priority == self.priority:
            raise ConversationStateError(f"already in queue {queue}")
        self.trigger_event(
            self.Queued, queue=queue, priority=priority, reason=reason, actor=actor, at=at
        )

    def change_priority(self, priority: int, *, reason: str, actor: str, at: str) -> None:
        _check_priority(priority)
        if priority == self.priority:
            raise ConversationStateError(f"priority is already {priority}")
        self.trigger_event(
            self.PriorityChanged, priority=priority, reason=reason, actor=actor, at=at
        )

    def offer(self, agent: str, *, expires_at: str | None, reason: str, at: str) -> None:
        if self.status == RESOLVED or self.assignee is not None:
            raise ConversationStateError("only an unassigned open conversation is offered")
        if self.offered_to is not None:
            raise ConversationStateError(f"already offered to {self.offered_to}")
        self.trigger_event(
            self.Offered, agent=agent, expires_at=expires_at, reason=reason, actor=ROUTER, at=at
        )

    def lapse_offer(self, agent: str, *, reason: str, actor: str, at: str) -> None:
        if self.offered_to != agent:
            raise ConversationStateError(f"no offer to {agent} is outstanding")
        self.trigger_event(self.OfferLapsed, agent=agent, reason=reason, actor=actor, at=at)

    def record_sla(self, kind: str, due_at: str, *, breached: bool, actor: str, at: str) -> None:
        event = self.SlaBreached if breached else self.SlaWarned
        self.trigger_event(event, kind=kind, due_at=due_at, actor=actor, at=at)

    def queue_survey(
        self, message_id: str, channel: str, text: str, *, actor: str, at: str
    ) -> None:
        if self.status != RESOLVED:
            raise ConversationStateError("the survey follows a resolution")
        self.trigger_event(
            self.SurveyQueued, message_id=message_id, channel=channel, text=text, actor=actor, at=at
        )

    def transfer(self, queue: str, *, actor: str, at: str) -> None:
        if self.status == RESOLVED:
            raise ConversationStateError("a resolved conversation cannot be transferred")
        if queue == self.queue:
            raise ConversationStateError(f"already in queue {queue}")
        self.trigger_event(self.Transferred, queue=queue, actor=actor, at=at)

    def escalate(self, reason: str, *, actor: str, at: str) -> None:
        if self.status == RESOLVED:
            raise ConversationStateError("a resolved conversation cannot be escalated")
        if self.escalated:
            raise ConversationStateError("already escalated")
        self.trigger_event(self.Escalated, reason=reason, actor=actor, at=at)

    def mark_pending(self, *, actor: str, at: str) -> None:
        if self.status != OPEN:
            raise ConversationStateError(f"only an open conversation can wait; it is {self.status}")
        self.trigger_event(self.MarkedPending, actor=actor, at=at)

    def resolve(self, *, actor: str, at: str) -> None:
        if self.status == RESOLVED:
            raise ConversationStateError("already resolved")
        self.trigger_event(self.Resolved, actor=actor, at=at)

    def reopen(self, *, actor: str, at: str, reason: str = "reopened by agent") -> None:
        if self.status != RESOLVED:
            raise ConversationStateError(
                f"only a resolved conversation can reopen; it is {self.status}"
            )
        self.trigger_event(self.Reopened, reason=reason, actor=actor, at=at)
