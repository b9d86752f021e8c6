"""A callback: a caller asked to be called back instead of holding on; the dialer calls them
once an agent is assigned to their conversation (docs/callbacks.md).

States: waiting -> dialing -> dialed -> completed, or back to waiting after a failed attempt,
or failed after the last one; cancelled while waiting. `Dialing` is recorded before the call
is placed and `Dialed` after, so a dialer that stopped between the two finds out on restart
whether the call exists (and adopts it) instead of forgetting it or placing it twice.

The id is named after the `callback.requested` contact event, so the same request taken in
twice is one callback.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from inbox.domain.base import DomainAggregate
from inbox.domain.errors import DomainError

WAITING, DIALING, DIALED = "waiting", "dialing", "dialed"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
OPEN_STATES = frozenset({WAITING, DIALING, DIALED})
IN_FLIGHT = frozenset({DIALING, DIALED})
FAILURE_STATUSES = frozenset({"no-answer", "busy", "failed", "machine"})
DIALER = "dialer"
# Cancellation reasons
GOT_THROUGH = "customer got through"
DUPLICATE = "duplicate"

_NAMESPACE = UUID("3d7c2f0e-5b8a-4c61-9e2f-7a4b1c6d8e90")


class CallbackStateError(DomainError):
    pass


def callback_id(source_event_id: str) -> UUID:
    return uuid5(_NAMESPACE, "callback:" + source_event_id)


class Callback(DomainAggregate):
    class Requested(Aggregate.Created):
        """`source_event_id`: the `callback.requested` contact event; `call_sid` the call
        the customer asked from; `requested_at` when they asked."""

        class_version = 1
        source_event_id: str
        conversation_id: str
        call_sid: str | None
        number: str
        queue: str
        requested_at: str
        actor: str
        at: str

    class Cancelled(Aggregate.Event):
        class_version = 1
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = CANCELLED
            aggregate.reason = self.reason

    class DialScheduled(Aggregate.Event):
        """Attempt `attempt` waits until `not_before` (the queue's next opening)."""

        class_version = 1
        attempt: int
        not_before: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.not_before = self.not_before

    class Dialing(Aggregate.Event):
        """About to place attempt `attempt` for `agent` (recorded before the REST call)."""

        class_version = 1
        attempt: int
        agent: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = DIALING
            aggregate.attempts = self.attempt
            aggregate.agent = self.agent
            aggregate.dialing_at = self.at

    class Dialed(Aggregate.Event):
        class_version = 1
        attempt: int
        call_sid: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = DIALED
            aggregate.call_sid = self.call_sid
            aggregate.call_sids.append(self.call_sid)

    class AttemptFailed(Aggregate.Event):
        """`status`: no-answer, busy, failed or machine; `retry_at` None: no attempt left."""

        class_version = 1
        attempt: int
        status: str
        retry_at: str | None
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = WAITING
            aggregate.not_before = self.retry_at
            aggregate.agent = aggregate.call_sid = aggregate.dialing_at = None

    class Completed(Aggregate.Event):
        """A person answered and was connected to `agent`."""

        class_version = 1
        attempt: int
        call_sid: str
        agent: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = COMPLETED

    class Failed(Aggregate.Event):
        """Given up after `attempts` attempts (`callback.failed`)."""

        class_version = 1
        attempts: int
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = FAILED
            aggregate.reason = self.reason

    @staticmethod
    def create_id(source_event_id: str) -> UUID:
        return callback_id(source_event_id)

    def __init__(
        self,
        source_event_id: str,
        conversation_id: str,
        call_sid: str | None,
        number: str,
        queue: str,
        requested_at: str,
        actor: str,
        at: str,
    ) -> None:
        self.source_event_id = source_event_id
        self.conversation_id = conversation_id
        self.number = number
        self.queue = queue
        self.requested_at = requested_at
        self.status = WAITING
        self.attempts = 0
        self.not_before: str | None = None
        self.agent: str | None = None
        self.dialing_at: str | None = None
        self.call_sid: str | None = None
        self.call_sids: list[str] = []
        self.reason: str | None = None

    @classmethod
    def request(
        cls,
        *,
        source_event_id: str,
        conversation_id: str,
        call_sid: str | None,
        number: str,
        queue: str,
        requested_at: str,
        actor: str = DIALER,
        at: str,
    ) -> Callback:
        if not number.startswith("+"):
            raise CallbackStateError(f"a callback number is E.164, got {number!r}")
        return cls._create(
            cls.Requested,
            source_event_id=source_event_id,
            conversation_id=conversation_id,
            call_sid=call_sid,
            number=number,
            queue=queue,
            requested_at=requested_at,
            actor=actor,
            at=at,
        )

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATES

    # -- commands ---------------------------------------------------------------------------

    def cancel(self, reason: str, *, actor: str = DIALER, at: str) -> None:
        """Only while waiting: a call in flight finishes first (its outcome is recorded)."""
        if self.status != WAITING:
            raise CallbackStateError(
                f"only a waiting callback can be cancelled; it is {self.status}"
            )
        self.trigger_event(self.Cancelled, reason=reason, actor=actor, at=at)

    def schedule(self, not_before: str, *, actor: str = DIALER, at: str) -> None:
        if self.status != WAITING:
            raise CallbackStateError(f"only a waiting callback is scheduled; it is {self.status}")
        if not_before == self.not_before:
            raise CallbackStateError(f"already scheduled for {not_before}")
        self.trigger_event(
            self.DialScheduled, attempt=self.attempts + 1, not_before=not_before, actor=actor, at=at
        )

    def start_dialing(self, agent: str, *, max_attempts: int, actor: str = DIALER, at: str) -> int:
        """Records the next attempt for `agent`; returns its number."""
        if self.status != WAITING:
            raise CallbackStateError(f"only a waiting callback is dialled; it is {self.status}")
        if self.attempts >= max_attempts:
            raise CallbackStateError(f"all {max_attempts} attempts were made")
        if self.not_before is not None and at < self.not_before:
            raise CallbackStateError(f"not to be dialled before {self.not_before}")
        attempt = self.attempts + 1
        self.trigger_event(self.Dialing, attempt=attempt, agent=agent, actor=actor, at=at)
        return attempt

    def dialed(self, attempt: int, call_sid: str, *, actor: str = DIALER, at: str) -> None:
        self._check_attempt(attempt, DIALING)
        if not call_sid:
            raise CallbackStateError("a dialled call has a CallSid")
        self.trigger_event(self.Dialed, attempt=attempt, call_sid=call_sid, actor=actor, at=at)

    def attempt_failed(
        self, attempt: int, status: str, *, retry_at: str | None, actor: str = DIALER, at: str
    ) -> None:
        """The attempt's call was not answered by a person (or could not be placed)."""
        if self.status not in IN_FLIGHT or attempt != self.attempts:
            raise CallbackStateError(f"attempt {attempt} is not in flight")
        if status not in FAILURE_STATUSES:
            raise CallbackStateError(f"a failed attempt is one of {sorted(FAILURE_STATUSES)}")
        self.trigger_event(
            self.AttemptFailed,
            attempt=attempt,
            status=status,
            retry_at=retry_at,
            actor=actor,
            at=at,
        )

    def complete(self, attempt: int, call_sid: str, *, actor: str = DIALER, at: str) -> None:
        self._check_attempt(attempt, DIALED)
        if call_sid != self.call_sid:
            raise CallbackStateError(f"attempt {attempt} is call {self.call_sid}, not {call_sid}")
        agent = self.agent or ""
        self.trigger_event(
            self.Completed, attempt=attempt, call_sid=call_sid, agent=agent, actor=actor, at=at
        )

    def give_up(self, reason: str, *, actor: str = DIALER, at: str) -> None:
        if self.status != WAITING:
            raise CallbackStateError(f"only a waiting callback is given up; it is {self.status}")
        self.trigger_event(self.Failed, attempts=self.attempts, reason=reason, actor=actor, at=at)

    def _check_attempt(self, attempt: int, status: str) -> None:
        if self.status != status or attempt != self.attempts:
            raise CallbackStateError(
                f"attempt {attempt} is not {status} (callback {self.status}, "
                f"attempt {self.attempts})"
            )


__all__ = [
    "CANCELLED",
    "COMPLETED",
    "DIALED",
    "DIALER",
    "DIALING",
    "DUPLICATE",
    "FAILED",
    "GOT_THROUGH",
    "WAITING",
    "Callback",
    "CallbackStateError",
    "callback_id",
]
