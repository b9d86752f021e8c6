"""The callback dialer: turns `callback.requested` into `Callback` aggregates and calls the
customer back once an agent is assigned to their conversation (docs/callbacks.md).

It follows the event store's log, like the distributor: everything it knows (requests,
assignments, resolutions, and its own Callback events) comes from the log, so a restarted
dialer reads it again from the start and carries on where it stopped. The router keeps the
conversation waiting in its queue (virtual hold) and offers it to an agent as usual; when the
conversation is Assigned to an agent with a `voice_to`, the dialer records `Dialing`, places
the call (`<Say>` then `<Dial>` the agent), records `Dialed`, and polls the call until it is
over: answered by a person -> `Completed`; no-answer, busy, failed or a machine ->
`AttemptFailed` with the next backoff step moved into the queue's business hours, or `Failed`
after the last attempt.

A connected callback is a call in the customer's timeline like an inbound one: once the
dialer records `Completed` it publishes `call.answered` and `call.ended` (with durations,
`direction: "outbound"`, `callback_id`) through the contact-events publisher, event ids
`{CallSid}:answered` / `{CallSid}:ended` as the voice webhooks build them, so a second
publication (a retry, a restarted dialer) is taken in once. A `Completed` whose `call.ended`
is not in the log when the dialer reads it again is published again after a restart.

A `Dialing` without `Dialed` (the dialer stopped between the REST call and the record, or
Twilio's answer was lost) is put right by asking Twilio: a call placed to the number since
then is adopted, otherwise the call is placed again, so no callback is forgotten or doubled.

`step()` is one round: reading the log and recording events run in a thread (eventsourcing is
synchronous), the REST calls are awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from adapters.kafka import PublishFailed
from inbox.contact import ContactEvent, ThreadRef
from inbox.domain.business_hours import BusinessHours
from inbox.domain.callback import (
    DIALED,
    DIALING,
    DUPLICATE,
    GOT_THROUGH,
    WAITING,
    Callback,
    callback_id,
)
from inbox.domain.errors import DomainError
from inbox.domain.sla import SlaPolicy
from inbox.domain.time import Clock, iso, parse_iso, system_clock
from inbox.ports import Publisher
from inbox.thread_tokens import conversation_token
from ivr.connector import conversation_customer
from ivr.twilio_rest import (
    CallStatus,
    PermanentFailure,
    TwilioCalls,
    TwilioCallsError,
    dial_twiml,
)
from projections.base import Event
from projections.runner import LogSource, decode, read_log

log = logging.getLogger(__name__)

HANDLES = frozenset(
    {
        "Conversation.ActivityRecorded",
        "Conversation.Assigned",
        "Conversation.Transferred",
        "Conversation.Resolved",
        "Callback.Requested",
        "Callback.Cancelled",
        "Callback.DialScheduled",
        "Callback.Dialing",
        "Callback.Dialed",
        "Callback.AttemptFailed",
        "Callback.Completed",
        "Callback.Failed",
    }
)
GREETING = "Connecting you to an agent, who is returning your call."
# Twilio's clock and ours may differ a little: a call placed just after `Dialing` may carry
# a creation time slightly before it.
CLOCK_SLACK = timedelta(seconds=60)
DEFAULT_QUEUE = "default"


class EventStoreLike(LogSource, Protocol):
    def get(self, aggregate_id: UUID) -> Any: ...

    def record(self, events: Sequence[Any]) -> Sequence[int]: ...


class TokenBucket:
    """At most `rate` takes per second, evenly spaced (a bucket of one token): Twilio queues
    calls placed faster than the account's calls-per-second, so a burst would only wait there."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("calls_per_second must be > 0")
        self.interval = 1.0 / rate
        self._next: float | None = None  # when the next token is there; None: now

    def take(self, now: float) -> bool:
        if self._next is not None and now < self._next:
            return False
        self._next = max(now, self._next or now) + self.interval
        return True

    def ready_at(self) -> float | None:
        return self._next


@dataclass
class _Request:
    """A `callback.requested` activity that has no Callback yet."""

    source_event_id: str
    conversation_id: str
    call_sid: str | None
    number: str
    queue: str
    at: str


@dataclass
class _Callback:
    """What the dialer knows of one Callback, from its events."""

    id: str
    conversation_id: str
    number: str
    queue: str
    requested_at: str
    seq: int  # requests in the order the log has them: the older first
    version: int = 0
    status: str = WAITING
    attempts: int = 0
    not_before: str | None = None
    agent: str | None = None
    dialing_at: str | None = None
    call_sid: str | None = None
    sids: list[str] = field(default_factory=list)
    requested_call_sid: str | None = None  # the call the customer asked from


@dataclass
class _Connected:
    """A completed callback call whose `call.answered` / `call.ended` are to be published."""

    callback: _Callback
    attempt: int
    call_sid: str
    agent: str
    status: CallStatus | None = None  # from the poll that saw it end; None: fetch it
    not_before: float = 0.0  # clock seconds: Twilio or Kafka failed, try again then


@dataclass(frozen=True)
class _Dial:
    callback: str
    attempt: int
    number: str
    voice_to: str


@dataclass(frozen=True)
class _Reconcile:
    callback: str
    attempt: int
    number: str
    voice_to: str | None
    since: datetime
    known: frozenset[str]


@dataclass(frozen=True)
class _Poll:
    callback: str
    attempt: int
    call_sid: str


class CallbackDialer:
    def __init__(
        self,
        store: EventStoreLike,
        *,
        calls: TwilioCalls,
        caller_id: str,
        agent_voice_to: Callable[[str], str | None],
        hours_for: Callable[[str], BusinessHours],
        max_attempts: int = 3,
        backoff: Sequence[float] = (120, 600, 1800),
        calls_per_second: float = 1.0,
        clock: Clock = system_clock,
        poll_every: float = 2.0,
        reconcile_after: float = 10.0,
        retry_after: float = 30.0,
        batch_size: int = 2000,
        publisher: Publisher | None = None,
        announce_within: timedelta = timedelta(hours=24),
    ) -> None:
        """`publisher`: where the calls of connected callbacks go as contact events (None:
        nowhere); `announce_within`: a Completed older than this, found unpublished on
        reading the log, is history from before publishing existed and stays so."""
        if max_attempts < 1 or not backoff:
            raise ValueError("at least one attempt and one backoff step")
        self.store = store
        self.calls = calls
        self.caller_id = caller_id
        self.agent_voice_to = agent_voice_to
        self.hours_for = hours_for
        self.max_attempts = max_attempts
        self.backoff = tuple(float(b) for b in backoff)
        self.bucket = TokenBucket(calls_per_second)
        self.clock = clock
        self.poll_every = poll_every
        # a Dialing without Dialed is looked into this long after it (Twilio lists a call
        # once it has left its own queue) and, while Twilio cannot be reached, this often
        self.reconcile_after = reconcile_after
        self.retry_after = retry_after
        self.batch_size = batch_size
        self.publisher = publisher
        self.announce_within = announce_within
        self.position = 0
        self.callbacks: dict[str, _Callback] = {}  # the open ones
        self._closed: set[str] = set()
        self._seq = itertools.count()
        self._requests: dict[str, _Request] = {}  # callback id -> request, in log order
        self._open: dict[tuple[str, str], str] = {}  # (number, queue) -> open callback id
        self._assignee: dict[str, str] = {}  # conversation id -> agent
        self._by_conversation: dict[str, list[str]] = {}  # callbacks requested so far
        self._got_through: set[str] = set()  # callbacks whose customer got through
        self._ours: set[str] = set()  # call sids of our callback calls
        self._next_poll: dict[str, float] = {}
        self._reconcile_at: dict[str, float] = {}
        self._no_voice: set[tuple[str, str]] = set()  # (callback, agent) logged once
        self._connected: dict[str, _Connected] = {}  # call sid -> to publish

    # -- reading the log ---------------------------------------------------------------------

    def catch_up(self) -> int:
        total = 0
        while True:
            records = read_log(self.store, self.position, self.batch_size)
            if not records:
                return total
            for event in decode(records, HANDLES):
                self.apply(event)
            self.position = records[-1][0]
            total += len(records)

    def apply(self, e: Event) -> None:
        kind, _, short = e.name.partition(".")
        if kind == "Callback":
            self._callback_event(short, e.originator_id, e.version, e.state)
        else:
            self._conversation_event(short, e.originator_id, e.state)

    def _conversation_event(self, short: str, cid: str, s: Mapping[str, Any]) -> None:
        if short == "Assigned":
            if s["agent"] is None:
                self._assignee.pop(cid, None)
            else:
                self._assignee[cid] = s["agent"]
        elif short == "Transferred":
            self._assignee.pop(cid, None)
        elif short == "Resolved":
            self._assignee.pop(cid, None)
            self._customer_got_through(cid)
        elif short == "ActivityRecorded":
            data = s.get("data") or {}
            if s["activity"] == "callback.requested":
                self._requested(cid, s, data)
            elif s["activity"] == "call.answered" and not _callback_call(data, self._ours):
                # answered on another call after asking to be called back
                self._customer_got_through(cid)
            elif s["activity"] == "call.ended":
                # published and taken in: nothing left to publish for that call
                self._connected.pop(str(data.get("call_sid")), None)

    def _customer_got_through(self, cid: str) -> None:
        asked = self._by_conversation.pop(cid, ())
        self._got_through.update(k for k in asked if k not in self._closed)

    def _requested(self, cid: str, s: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        number = data.get("number")
        if not isinstance(number, str) or not number.startswith("+"):
            log.warning("callback request %s without an E.164 number", s["source_event_id"])
            return
        key = str(callback_id(s["source_event_id"]))
        self._by_conversation.setdefault(cid, []).append(key)
        if key not in self.callbacks and key not in self._closed:
            call_sid = data.get("call_sid")
            self._requests[key] = _Request(
                source_event_id=s["source_event_id"],
                conversation_id=cid,
                call_sid=call_sid if isinstance(call_sid, str) else None,
                number=number,
                queue=str(data.get("queue") or DEFAULT_QUEUE),
                at=s["at"],
            )

    def _callback_event(self, short: str, oid: str, version: int, s: Mapping[str, Any]) -> None:
        cb = self.callbacks.get(oid)
        if short == "Requested":
            if cb is not None or oid in self._closed:
                return
            cb = self.callbacks[oid] = _Callback(
                id=oid,
                conversation_id=s["conversation_id"],
                number=s["number"],
                queue=s["queue"],
                requested_at=s["requested_at"],
                seq=next(self._seq),
                requested_call_sid=s.get("call_sid"),
            )
            self._requests.pop(oid, None)
            # a duplicate's Requested comes before its Cancelled: the first one stays open
            self._open.setdefault((cb.number, cb.queue), oid)
        if cb is None or version <= cb.version:
            return  # closed, or recorded by this dialer and applied already
        cb.version = version
        if short in ("Cancelled", "Completed", "Failed"):
            # closed for good: only its id is kept
            del self.callbacks[oid]
            if short == "Completed":  # the customer's other requests are answered with it
                self._customer_got_through(cb.conversation_id)
                self._completed(cb, s)
            self._closed.add(oid)
            if self._open.get((cb.number, cb.queue)) == oid:
                del self._open[(cb.number, cb.queue)]
            for table in (self._next_poll, self._reconcile_at):
                table.pop(oid, None)
            self._got_through.discard(oid)
        elif short == "DialScheduled":
            cb.not_before = s["not_before"]
        elif short == "Dialing":
            cb.status, cb.attempts = DIALING, s["attempt"]
            cb.agent, cb.dialing_at = s["agent"], s["at"]
        elif short == "Dialed":
            cb.status, cb.call_sid = DIALED, s["call_sid"]
            cb.sids.append(s["call_sid"])
            self._ours.add(s["call_sid"])
            self._reconcile_at.pop(oid, None)
        elif short == "AttemptFailed":
            cb.status, cb.not_before = WAITING, s["retry_at"]
            cb.agent = cb.call_sid = cb.dialing_at = None
            self._next_poll.pop(oid, None)

    def _completed(self, cb: _Callback, s: Mapping[str, Any]) -> None:
        if self.publisher is None:
            return
        if parse_iso(s["at"]) < self.clock() - self.announce_within:
            return
        self._connected[s["call_sid"]] = _Connected(cb, s["attempt"], s["call_sid"], s["agent"])

    # -- recording ---------------------------------------------------------------------------

    def _record(self, events: Sequence[Any]) -> int:
        self.store.record(events)
        for event in events:
            state = {
                k: v
                for k, v in vars(event).items()
                if k not in ("originator_id", "originator_version", "timestamp")
            }
            short = type(event).__name__
            self._callback_event(short, str(event.originator_id), event.originator_version, state)
        return len(events)

    def _act(self, key: str, act: Callable[[Callback, str], object]) -> int:
        """Decides on the stored aggregate and records; 0 when its state refuses."""
        for _ in range(3):
            callback = self.store.get(UUID(key))
            if not isinstance(callback, Callback):
                return 0
            try:
                act(callback, iso(self.clock()))
                return self._record(callback.collect_events())
            except IntegrityError:
                continue  # written meanwhile: decide again on fresh state
            except DomainError as exc:
                log.info("callback %s: %s", key, exc)
                return 0
        return 0

    def _open_requests(self) -> int:
        recorded = 0
        for key, req in list(self._requests.items()):
            callback = Callback.request(
                source_event_id=req.source_event_id,
                conversation_id=req.conversation_id,
                call_sid=req.call_sid,
                number=req.number,
                queue=req.queue,
                requested_at=req.at,
                at=iso(self.clock()),
            )
            # the customer asked once already and is still waiting for that one
            if (req.number, req.queue) in self._open:
                callback.cancel(DUPLICATE, at=iso(self.clock()))
            elif key in self._got_through:
                callback.cancel(GOT_THROUGH, at=iso(self.clock()))
            try:
                recorded += self._record(callback.collect_events())
            except IntegrityError:
                log.info("callback %s exists already", key)
            self._requests.pop(key, None)
        return recorded

    # -- deciding (in a thread) --------------------------------------------------------------

    def _round(self) -> tuple[int, list[_Dial | _Reconcile | _Poll]]:
        self.catch_up()
        recorded = self._open_requests()
        now = self.clock()
        at = iso(now)
        actions: list[_Dial | _Reconcile | _Poll] = []
        # one call at a time per conversation (a customer may wait in two queues)
        busy = {c.conversation_id for c in self.callbacks.values() if c.status != WAITING}
        for cb in sorted(self.callbacks.values(), key=lambda c: c.seq):
            if cb.status == WAITING and cb.id in self._got_through:
                recorded += self._act(cb.id, lambda c, at: c.cancel(GOT_THROUGH, at=at))
            elif cb.status == DIALED:
                if self._next_poll.get(cb.id, 0.0) <= now.timestamp() and cb.call_sid:
                    actions.append(_Poll(cb.id, cb.attempts, cb.call_sid))
            elif cb.status == DIALING:
                reconcile = self._reconcile(cb, now)
                if reconcile is not None:
                    actions.append(reconcile)
            elif cb.conversation_id not in busy:
                done, dial = self._maybe_dial(cb, now, at)
                recorded += done
                if dial is not None:
                    actions.append(dial)
                    busy.add(cb.conversation_id)
        return recorded, actions

    def _reconcile(self, cb: _Callback, now: datetime) -> _Reconcile | None:
        dialing_at = parse_iso(cb.dialing_at or iso(now))
        when = self._reconcile_at.setdefault(cb.id, dialing_at.timestamp() + self.reconcile_after)
        if when > now.timestamp():
            return None
        voice_to = self.agent_voice_to(cb.agent) if cb.agent else None
        return _Reconcile(
            cb.id, cb.attempts, cb.number, voice_to, dialing_at - CLOCK_SLACK, frozenset(self._ours)
        )

    def _maybe_dial(self, cb: _Callback, now: datetime, at: str) -> tuple[int, _Dial | None]:
        agent = self._assignee.get(cb.conversation_id)
        if agent is None or (cb.not_before is not None and at < cb.not_before):
            return 0, None
        voice_to = self.agent_voice_to(agent)
        if voice_to is None:
            if (cb.id, agent) not in self._no_voice:
                self._no_voice.add((cb.id, agent))
                log.info("callback %s: agent %s takes no calls (no voice_to)", cb.id, agent)
            return 0, None
        hours = self.hours_for(cb.queue)
        if not hours.is_open(now):
            opening = hours.next_open(now)
            if opening is None:
                reason = f"queue {cb.queue} has no business hours"
                return self._act(cb.id, lambda c, at: c.give_up(reason, at=at)), None
            if cb.not_before == iso(opening):
                return 0, None
            return self._act(cb.id, lambda c, at: c.schedule(iso(opening), at=at)), None
        if not self.bucket.take(now.timestamp()):
            return 0, None
        attempt = cb.attempts + 1
        done = self._act(
            cb.id, lambda c, at: c.start_dialing(agent, max_attempts=self.max_attempts, at=at)
        )
        if not done:
            return 0, None
        return done, _Dial(cb.id, attempt, cb.number, voice_to)

    # -- calling (async) ---------------------------------------------------------------------

    async def step(self) -> int:
        """One round: read the log, decide, place and poll calls. Returns events recorded."""
        recorded, actions = await asyncio.to_thread(self._round)
        for action in actions:
            if isinstance(action, _Dial):
                recorded += await self._place(
                    action.callback, action.attempt, action.number, action.voice_to
                )
            elif isinstance(action, _Reconcile):
                recorded += await self._put_right(action)
            else:
                recorded += await self._poll(action)
        return recorded + await self._announce()

    async def _place(self, key: str, attempt: int, number: str, voice_to: str) -> int:
        twiml = dial_twiml(voice_to, say=GREETING)
        try:
            sid = await self.calls.create_call(number, self.caller_id, twiml)
        except PermanentFailure as exc:
            log.warning("callback %s: Twilio refused the call: %s", key, exc)
            return await asyncio.to_thread(self._refused, key, attempt, str(exc))
        except TwilioCallsError as exc:
            # whether Twilio placed it is unknown: looked into later (adopted or placed again)
            log.warning("callback %s: placing the call failed: %s", key, exc)
            self._reconcile_at[key] = self.clock().timestamp() + self.retry_after
            return 0
        return await asyncio.to_thread(self._act, key, lambda c, at: c.dialed(attempt, sid, at=at))

    def _refused(self, key: str, attempt: int, reason: str) -> int:
        def act(c: Callback, at: str) -> None:
            c.attempt_failed(attempt, "failed", retry_at=None, at=at)
            c.give_up(f"Twilio refused the call: {reason}", at=at)

        return self._act(key, act)

    async def _put_right(self, action: _Reconcile) -> int:
        """A Dialing without Dialed: adopt the call Twilio has, else place it again."""
        now = self.clock().timestamp()
        try:
            calls = await self.calls.list_calls(action.number, action.since)
        except TwilioCallsError as exc:
            log.warning("callback %s: cannot list calls: %s", action.callback, exc)
            self._reconcile_at[action.callback] = now + self.retry_after
            return 0
        ours = [
            c
            for c in calls
            if c.sid and c.sid not in action.known and c.from_ in (None, self.caller_id)
        ]
        if ours:
            first = min(ours, key=_creation_order)
            sid = first.sid or ""
            log.info("callback %s: adopting call %s placed before a restart", action.callback, sid)
            return await asyncio.to_thread(
                self._act, action.callback, lambda c, at: c.dialed(action.attempt, sid, at=at)
            )
        if action.voice_to is None:
            return await asyncio.to_thread(self._lost_agent, action.callback, action.attempt)
        if not self.bucket.take(now):
            self._reconcile_at[action.callback] = self.bucket.ready_at() or now
            return 0
        return await self._place(action.callback, action.attempt, action.number, action.voice_to)

    def _lost_agent(self, key: str, attempt: int) -> int:
        """Never placed, and the agent can no longer take it: back to waiting at once."""
        at = iso(self.clock())
        return self._act(key, lambda c, _: c.attempt_failed(attempt, "failed", retry_at=at, at=at))

    async def _poll(self, action: _Poll) -> int:
        now = self.clock()
        try:
            status = await self.calls.fetch_call(action.call_sid)
        except PermanentFailure as exc:  # Twilio does not know the call
            log.warning("callback %s: call %s: %s", action.callback, action.call_sid, exc)
            status = CallStatus("failed")
        except TwilioCallsError as exc:
            log.warning("callback %s: cannot fetch %s: %s", action.callback, action.call_sid, exc)
            self._next_poll[action.callback] = now.timestamp() + self.retry_after
            return 0
        if not status.terminal:
            self._next_poll[action.callback] = now.timestamp() + self.poll_every
            return 0
        return await asyncio.to_thread(self._outcome, action, status)

    def _outcome(self, action: _Poll, status: CallStatus) -> int:
        key, attempt = action.callback, action.attempt
        failure = failure_status(status)
        if failure is None:
            done = self._act(key, lambda c, at: c.complete(attempt, action.call_sid, at=at))
            connected = self._connected.get(action.call_sid)
            if connected is not None:
                connected.status = status  # no need to ask Twilio again
            return done
        cb = self.callbacks[key]
        if key in self._got_through:

            def act(c: Callback, at: str) -> None:
                c.attempt_failed(attempt, failure, retry_at=None, at=at)
                c.cancel(GOT_THROUGH, at=at)

        elif attempt >= self.max_attempts:

            def act(c: Callback, at: str) -> None:
                c.attempt_failed(attempt, failure, retry_at=None, at=at)
                c.give_up(
                    f"no answer from a person after {attempt} attempts (last: {failure})", at=at
                )

        else:
            retry = self.retry_at(cb.queue, attempt)

            def act(c: Callback, at: str) -> None:
                c.attempt_failed(
                    attempt, failure, retry_at=None if retry is None else iso(retry), at=at
                )
                if retry is None:
                    c.give_up(f"queue {cb.queue} has no business hours", at=at)

        return self._act(key, act)

    # -- the callback's call in the customer's timeline ---------------------------------------

    async def _announce(self) -> int:
        """Publishes call.answered + call.ended of each connected callback due; a failure
        (Twilio or Kafka) is tried again `retry_after` later."""
        if self.publisher is None:
            return 0
        published = 0
        now = self.clock().timestamp()
        for connected in [c for c in self._connected.values() if c.not_before <= now]:
            if connected.status is None:
                try:
                    connected.status = await self.calls.fetch_call(connected.call_sid)
                except TwilioCallsError as exc:
                    log.warning("callback call %s: cannot fetch: %s", connected.call_sid, exc)
                    connected.not_before = now + self.retry_after
                    continue
            try:
                customer = await asyncio.to_thread(
                    conversation_customer, self.store, connected.callback.conversation_id
                )
            except LookupError as exc:  # nobody to file it under: it cannot be told
                log.warning("callback call %s: %s", connected.call_sid, exc)
                self._connected.pop(connected.call_sid, None)
                continue
            answered, ended = call_events(connected, connected.status, customer, now=self.clock())
            try:
                # in order, under one key: the ingest sees the answer before the end
                await self.publisher.publish(answered)
                await self.publisher.publish(ended)
            except PublishFailed as exc:
                log.warning("callback call %s not published yet: %s", connected.call_sid, exc)
                connected.not_before = now + self.retry_after
                continue
            self._connected.pop(connected.call_sid, None)
            published += 1
        return published

    def retry_at(self, queue: str, attempt: int) -> datetime | None:
        """After attempt `attempt` failed: its backoff step from now, moved into hours."""
        delay = self.backoff[min(attempt, len(self.backoff)) - 1]
        return self.hours_for(queue).next_open(self.clock() + timedelta(seconds=delay))

    # -- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, poll_interval: float = 0.5) -> None:
        while not stop.is_set():
            try:
                recorded = await self.step()
            except Exception:  # a lost database connection: log, wait, carry on
                log.exception("callback dialer round failed")
                recorded = 0
            if recorded:
                continue  # what we recorded may allow more: look again at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval)


def _callback_call(data: Mapping[str, Any], ours: set[str]) -> bool:
    """A call.answered of one of our callback calls (not the customer getting through)."""
    return data.get("call_sid") in ours or bool(data.get("callback_id"))


def call_events(
    connected: _Connected, status: CallStatus, customer: Any, *, now: datetime
) -> tuple[ContactEvent, ContactEvent]:
    """`call.answered` and `call.ended` of a completed callback call, as the voice webhooks
    report an inbound call's, marked `direction: "outbound"` with the `callback_id`.

    Times from Twilio: the call ended at `end_time` (else now) and was answered `duration`
    seconds before (Twilio's duration of a placed call runs from the answer). Talk time is
    that whole duration: the greeting before the agent's leg is a few seconds of it."""
    cb = connected.callback
    duration = max(0, round(status.duration or 0))
    ended_at = status.ended_at or now
    answered_at = ended_at - timedelta(seconds=duration)
    waited = max(0.0, (answered_at - parse_iso(cb.requested_at)).total_seconds())
    marks: dict[str, Any] = {"direction": "outbound", "callback_id": cb.id}
    if cb.requested_call_sid:
        marks["requested_call_sid"] = cb.requested_call_sid
    thread = ThreadRef(ref=conversation_token(cb.conversation_id))

    def event(kind: Any, suffix: str, at: datetime, **payload: Any) -> ContactEvent:
        return ContactEvent(
            event_id=f"{connected.call_sid}:{suffix}",
            occurred_at=at,
            channel="voice",
            type=kind,
            customer=customer,
            thread=thread,
            payload={"call_sid": connected.call_sid, **payload, **marks},
        )

    answered = event(
        "call.answered",
        "answered",
        answered_at,
        queue=cb.queue,
        agent=connected.agent,
        # the wait of the customer who kept their place: since they asked for the callback
        queue_seconds=round(waited, 3),
        number=cb.number,
        attempt=connected.attempt,
    )
    ended = event(
        "call.ended",
        "ended",
        ended_at,
        ended_in="agent",
        queue=cb.queue,
        agent=connected.agent,
        talk_seconds=duration,
        hold_seconds=0,  # holds by the agent are not visible to us
        wrap_seconds=0,
        duration_seconds=duration,
    )
    return answered, ended


def _creation_order(call: CallStatus) -> tuple[float, str]:
    created = call.created_at.timestamp() if call.created_at is not None else float("inf")
    return created, call.sid or ""


def failure_status(status: CallStatus) -> str | None:
    """None when a person answered; else the AttemptFailed status."""
    if status.status == "completed":
        answered_by = (status.answered_by or "").lower()
        if answered_by.startswith("machine") or answered_by == "fax":
            return "machine"
        return None  # human, unknown (detection could not tell) or detection off
    if status.status in ("no-answer", "busy"):
        return status.status
    return "failed"  # failed, canceled


def directory_voice_to(directory: Any) -> Callable[[str], str | None]:
    """`agent_voice_to` from an inbox.agents.Directory: the agent's `voice_to`, if any."""

    def voice_to(agent_id: str) -> str | None:
        agent = directory.agent(agent_id)
        value = getattr(agent, "voice_to", None) if agent is not None else None
        return value if isinstance(value, str) and value else None

    return voice_to


def queue_hours(directory: Any) -> Callable[[str], BusinessHours]:
    """`hours_for` from an inbox.agents.Directory: the calendar of the queue's SLA policy;
    a queue without one (or not defined) is open 24/7."""

    def hours_for(queue: str) -> BusinessHours:
        defined = directory.queue(queue)
        sla = (defined.spec.get("sla") if defined is not None else None) or None
        if not sla:
            return BusinessHours.always()
        try:
            return SlaPolicy.from_dict({**sla, "queue": queue}).hours
        except ValueError as exc:
            log.warning("queue %s: business hours ignored: %s", queue, exc)
            return BusinessHours.always()

    return hours_for


__all__ = [
    "CallbackDialer",
    "TokenBucket",
    "call_events",
    "directory_voice_to",
    "failure_status",
    "queue_hours",
]
