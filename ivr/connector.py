"""The call connector: puts a caller waiting in a queue through to the agent who took their
conversation (docs/callbacks.md, "live calls").

It follows the event store's log. A voice conversation has a live queued call from its latest
`call.queued` until that call is answered, ends, is abandoned or turns into a callback
request. When such a conversation is `Assigned` to an agent with a `voice_to`, the connector
redirects the call (`update_call`, `<Dial>` the agent) and publishes a `call.answered` contact
event (event_id `{call_sid}:answered`, so the ingest takes it in once however often it is
published). The call.answered coming back through the log ends the call's wait for good.

Restarts: the connector rebuilds its state from the log. A call whose assignment it finds on
that first reading is put through only after `settle_after` seconds and a fresh look at the
log: a `call.answered` published just before the restart is in Kafka but maybe not yet in the
store, and redirecting an already bridged call would ring the agent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from adapters.kafka import PublishFailed
from inbox.contact import ContactEvent, CustomerRef, Social
from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer
from inbox.domain.time import Clock, parse_iso, system_clock
from inbox.ports import Publisher
from ivr.twilio_rest import PermanentFailure, TwilioCalls, TwilioCallsError, dial_twiml
from projections.base import Event
from projections.runner import LogSource, decode, read_log

log = logging.getLogger(__name__)

HANDLES = frozenset(
    {
        "Conversation.ActivityRecorded",
        "Conversation.Assigned",
        "Conversation.Transferred",
        "Conversation.Resolved",
    }
)
# After these the call waits in no queue any more (a callback request: the dialer's job).
_CALL_OVER = frozenset({"call.answered", "call.ended", "call.abandoned", "callback.requested"})


@dataclass
class _LiveCall:
    call_sid: str
    conversation_id: str
    queue: str
    queued_at: str


@dataclass
class _Connect:
    call: _LiveCall
    agent: str
    not_before: float  # clock seconds


@dataclass(frozen=True)
class _Answered:
    """Redirected; the call.answered is still to be published."""

    event: ContactEvent


class CallConnector:
    def __init__(
        self,
        store: Any,
        *,
        calls: TwilioCalls,
        publisher: Publisher,
        agent_voice_to: Callable[[str], str | None],
        clock: Clock = system_clock,
        settle_after: float = 5.0,
        retry_after: float = 5.0,
        batch_size: int = 2000,
    ) -> None:
        self.store = store
        self.log: LogSource = store
        self.calls = calls
        self.publisher = publisher
        self.agent_voice_to = agent_voice_to
        self.clock = clock
        self.settle_after = settle_after
        self.retry_after = retry_after
        self.batch_size = batch_size
        self.position = 0
        self.started = False
        self._live: dict[str, _LiveCall] = {}  # call_sid -> its wait
        self._waiting: dict[str, str] = {}  # conversation id -> call_sid of its live call
        self._connect: dict[str, _Connect] = {}  # call_sid -> to put through
        self._answered: dict[str, _Answered] = {}  # call_sid -> to publish

    # -- reading the log ---------------------------------------------------------------------

    def catch_up(self) -> int:
        total = 0
        while True:
            records = read_log(self.log, self.position, self.batch_size)
            if not records:
                self.started = True
                return total
            for event in decode(records, HANDLES):
                self.apply(event)
            self.position = records[-1][0]
            total += len(records)

    def apply(self, e: Event) -> None:
        cid, s = e.originator_id, e.state
        short = e.name.partition(".")[2]
        if short == "ActivityRecorded":
            self._activity(cid, s["activity"], s.get("data") or {}, s["at"])
        elif short == "Assigned":
            call_sid = self._waiting.get(cid)
            if call_sid is None:
                return
            if s["agent"] is None:
                self._connect.pop(call_sid, None)
                return
            # on the first reading of the log, whether it was done before is not known yet
            delay = 0.0 if self.started else self.settle_after
            self._connect[call_sid] = _Connect(
                self._live[call_sid], s["agent"], self.clock().timestamp() + delay
            )
        elif short in ("Transferred", "Resolved"):
            call_sid = self._waiting.get(cid)
            if call_sid is not None:
                self._connect.pop(call_sid, None)

    def _activity(self, cid: str, activity: str, data: Mapping[str, Any], at: str) -> None:
        call_sid = data.get("call_sid")
        if not isinstance(call_sid, str):
            return
        if activity == "call.queued":
            self._forget(call_sid)
            self._live[call_sid] = _LiveCall(call_sid, cid, str(data.get("queue") or ""), at)
            self._waiting[cid] = call_sid
        elif activity in _CALL_OVER:
            self._forget(call_sid)

    def _forget(self, call_sid: str) -> None:
        live = self._live.pop(call_sid, None)
        self._connect.pop(call_sid, None)
        if live is not None and self._waiting.get(live.conversation_id) == call_sid:
            del self._waiting[live.conversation_id]

    # -- acting ------------------------------------------------------------------------------

    def _due(self) -> list[tuple[_Connect, str, ContactEvent]]:
        """Catches up, then the connections due now, with the agent's voice_to and the
        call.answered to publish (reading the store: in a thread)."""
        self.catch_up()
        now = self.clock().timestamp()
        due: list[tuple[_Connect, str, ContactEvent]] = []
        for connect in [c for c in self._connect.values() if c.not_before <= now]:
            voice_to = self.agent_voice_to(connect.agent)
            if voice_to is None:
                log.info("call %s: agent %s takes no calls", connect.call.call_sid, connect.agent)
                self._connect.pop(connect.call.call_sid, None)
                continue
            try:
                event = self._answered_event(connect)
            except LookupError as exc:  # cannot be told to the ingest: leave the call be
                log.warning("call %s: %s", connect.call.call_sid, exc)
                self._connect.pop(connect.call.call_sid, None)
                continue
            due.append((connect, voice_to, event))
        return due

    async def step(self) -> int:
        """One round; returns how many calls were put through or announced."""
        done = 0
        for connect, voice_to, event in await asyncio.to_thread(self._due):
            done += await self._put_through(connect, voice_to, event)
        for call_sid, answered in list(self._answered.items()):
            done += await self._publish(call_sid, answered)
        return done

    async def _put_through(self, connect: _Connect, voice_to: str, event: ContactEvent) -> int:
        call = connect.call
        try:
            await self.calls.update_call(call.call_sid, dial_twiml(voice_to))
        except PermanentFailure as exc:  # the caller hung up meanwhile, or no such call
            log.warning("call %s: cannot put through to %s: %s", call.call_sid, connect.agent, exc)
            self._connect.pop(call.call_sid, None)
            return 0
        except TwilioCallsError as exc:
            log.warning("call %s: Twilio unreachable, retrying: %s", call.call_sid, exc)
            connect.not_before = self.clock().timestamp() + self.retry_after
            return 0
        # put through: this call waits no more, whatever the log says until its
        # call.answered comes back (a reassignment meanwhile must not redirect it again)
        self._forget(call.call_sid)
        self._answered[call.call_sid] = _Answered(event)
        return 1

    def _answered_event(self, connect: _Connect) -> ContactEvent:
        call, now = connect.call, self.clock()
        waited = max(0.0, (now - parse_iso(call.queued_at)).total_seconds())
        return ContactEvent(
            event_id=f"{call.call_sid}:answered",
            occurred_at=now,
            channel="voice",
            type="call.answered",
            customer=self._customer(call.conversation_id),
            payload={
                "call_sid": call.call_sid,
                "queue": call.queue,
                "agent": connect.agent,
                "queue_seconds": round(waited, 3),
            },
        )

    def _customer(self, conversation_id: str) -> CustomerRef:
        return conversation_customer(self.store, conversation_id)

    async def _publish(self, call_sid: str, answered: _Answered) -> int:
        try:
            await self.publisher.publish(answered.event)
        except PublishFailed as exc:
            log.warning("call %s: call.answered not published yet: %s", call_sid, exc)
            return 0
        self._answered.pop(call_sid, None)
        return 1

    # -- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, poll_interval: float = 0.2) -> None:
        while not stop.is_set():
            try:
                done = await self.step()
            except Exception:  # a lost database connection: log, wait, carry on
                log.exception("call connector round failed")
                done = 0
            if done:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval)


def conversation_customer(store: Any, conversation_id: str) -> CustomerRef:
    """The customer of a conversation as a contact event names them: their phone (or, failing
    that, another identity of theirs: a contact event needs one). LookupError when none."""
    conversation = store.get(UUID(conversation_id))
    customer = None
    if isinstance(conversation, Conversation):
        customer = store.get(UUID(conversation.customer_id))
    while isinstance(customer, Customer) and customer.merged_into is not None:
        customer = store.get(UUID(customer.merged_into))
    identities: list[str] = list(customer.identities) if isinstance(customer, Customer) else []
    for key in sorted(identities, key=lambda k: not k.startswith("phone:")):
        ref = _customer_ref(key)
        if ref is not None:
            return ref
    raise LookupError(f"conversation {conversation_id}: no customer identity")


def _customer_ref(identity_key: str) -> CustomerRef | None:
    kind, _, value = identity_key.partition(":")
    if not value:
        return None
    if kind == "phone":
        return CustomerRef(phone=value)
    if kind == "email":
        return CustomerRef(email=value)
    if kind == "visitor":
        return CustomerRef(visitor=value)
    return CustomerRef(social=Social(network=kind, id=value))


__all__ = ["CallConnector", "conversation_customer"]
