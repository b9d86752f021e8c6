"""Automatic distribution and the SLA monitor: one process that follows the event store's log,
keeps the router's state (inbox.domain.routing) and every open conversation's SLA clocks, and
records what it decides as events: `Queued` (which queue a conversation enters), `Offered` /
`Assigned` (the router's choice), `OfferLapsed`, `SlaWarned` / `SlaBreached` and the actions a
policy names (priority raised, back to the queue, moved to the escalation queue), agents made
away after missed offers.

Everything it knows comes from the log, so a restarted distributor rebuilds the same state by
reading it again from the start (decisions wait until it has caught up). Its decisions come
back through the log too; the router applies them idempotently. A decision that can no longer
be recorded (the agent claimed the conversation first, it was resolved meanwhile) is dropped
and the router is put right from the aggregate's current state.

Capacity freed by a resolve, a transfer or a presence change is used at once: the API calls
`nudge()` after storing a command, and every round decides right after reading the log.

Given somewhere to keep it (`ProcessStates`), the process saves its whole state with its log
position every `save_every` events and when it stops, and a restart takes that up and reads
only the log after it (inbox/routing_state.py says when a saved state is not used). Each save
sets resolved conversations aside there instead of keeping them in memory; the log's next
event of one reads it back first (`save_state`, `_take_back`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from inbox import routing_state, telemetry
from inbox.agents import Directory
from inbox.domain.conversation import MAX_PRIORITY, RESOLVED, ROUTER, Conversation
from inbox.domain.errors import DomainError
from inbox.domain.queue import DEFAULT_QUEUE
from inbox.domain.routing import AgentSpec, Offer, OfferLapsed, QueueSpec, Router
from inbox.domain.sla import SlaClock, SlaPolicy, earliest_due, running_clocks
from inbox.domain.time import Clock, iso, parse_iso, system_clock
from inbox.ports import ProcessStates
from ivr.estimate import HandleTimes, estimate_wait
from projections.base import Event
from projections.db import DatabaseError
from projections.runner import LogSource, decode, diverged, gc_paused, read_log, record_id

log = logging.getLogger(__name__)

HANDLES = frozenset(
    {
        "Agent.Registered",
        "Agent.ProfileChanged",
        "Agent.PresenceChanged",
        "Queue.Defined",
        "Queue.Changed",
        "Customer.VipChanged",
        "Conversation.Opened",
        "Conversation.MessageReceived",
        "Conversation.ActivityRecorded",
        "Conversation.ReplyQueued",
        "Conversation.Queued",
        "Conversation.PriorityChanged",
        "Conversation.Offered",
        "Conversation.OfferLapsed",
        "Conversation.Assigned",
        "Conversation.Transferred",
        "Conversation.Resolved",
        "Conversation.Reopened",
        "Conversation.SlaWarned",
        "Conversation.SlaBreached",
        "Callback.Requested",
        "Callback.Failed",
        "Callback.Completed",
        "Callback.Cancelled",
    }
)
VIP_PRIORITY = 2
# A saved state is replaced after this many events read (and when the process stops): a
# restart then reads at most about this many before it decides again.
SAVE_EVERY = 100_000
_SAVE_ERRORS: tuple[type[Exception], ...] = (
    pickle.PicklingError,
    TypeError,
    AttributeError,
    *DatabaseError,
)
# What is the process's own, not what the log taught it: never saved.
_NOT_STATE = frozenset(
    {
        "decide",
        "store",
        "log",
        "directory",
        "clock",
        "batch_size",
        "caught_up",
        "voice_view",
        "stats",
        "states",
        "save_every",
        "_saved_at",
        "_initial",
        "_wake",
        "_loop",
    }
)
# The key of a conversation's record set aside (`Distributor.save_state`).
_SET_ASIDE = "conversation"
# Calls wait for routing from `call.queued` (the IVR chose a queue), not from `call.started`.
_WAITING_ACTIVITIES = frozenset({"call.queued", "chat.started"})
_ENDED_ACTIVITIES = frozenset({"call.abandoned", "call.ended"})


def _seconds(at: str) -> float:
    return parse_iso(at).timestamp()


def _iso(seconds: float) -> str:
    return iso(datetime.fromtimestamp(seconds, UTC))


@dataclass
class ConversationState:
    customer: str
    channel: str
    queue: str | None = None
    priority: int = 0
    status: str = "open"
    assignee: str | None = None
    offered_to: str | None = None
    waiting_since: str | None = None
    cycle_started_at: str = ""
    first_response_at: str | None = None
    callback_calls: set[str] = field(default_factory=set)  # calls that asked for a callback
    # SLA (kind, due_at) already recorded as warned / breached in this cycle
    warned: set[tuple[str, str]] = field(default_factory=set)
    breached: set[tuple[str, str]] = field(default_factory=set)
    sla_stamp: int = 0


@dataclass(frozen=True)
class VoiceView:
    positions: dict[str, int]  # call sid -> place in its queue
    staffing: dict[str, tuple[int, int]]  # queue -> (agents free, agents busy)
    depth: dict[str, int]
    handle_times: dict[str, list[float]]  # queue ("" = any) -> recent handle times


@dataclass(frozen=True)
class QueueConfig:
    name: str
    spec: dict[str, Any]
    policy: SlaPolicy | None

    @classmethod
    def of(cls, name: str, spec: dict[str, Any]) -> QueueConfig:
        sla = spec.get("sla")
        policy = None
        if sla:
            try:
                policy = SlaPolicy.from_dict({**sla, "queue": name})
            except ValueError as exc:  # checked when defined; a stored bad one is skipped
                log.warning("queue %s: SLA policy ignored: %s", name, exc)
        return cls(name, spec, policy)

    # Saved without the policy (its calendar holds a time zone and read-only mappings):
    # taken up again, it is made from the spec as when the queue was defined.
    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        made = QueueConfig.of(state["name"], state["spec"])
        for name, value in vars(made).items():
            object.__setattr__(self, name, value)


@dataclass
class RoundStats:
    read: int = 0
    recorded: int = 0
    dropped: int = 0


class Distributor:
    def __init__(
        self,
        store: Any,
        directory: Directory,
        *,
        router: Router | None = None,
        clock: Clock = system_clock,
        batch_size: int = 2000,
        decide: bool = True,
        states: ProcessStates | None = None,
        save_every: int = SAVE_EVERY,
    ) -> None:
        """`decide` False: a mirror that follows the log and keeps the queues' live picture
        (for the IVR's wait estimates in an `inbox serve` process) but records nothing.
        `states`: where the state is saved and taken up again (see the module doc)."""
        self.decide = decide
        self.store = store
        self.log: LogSource = store
        self.directory = directory
        self.router = router or Router()
        self.clock = clock
        self.batch_size = batch_size
        self.position = 0
        # What the log holds at `position` (`record_id`): a saved state is taken up only from
        # a store with the same record there, not from another store's history.
        self.last_read: str | None = None
        self.caught_up = False
        self.convs: dict[str, ConversationState] = {}
        self.queues: dict[str, QueueConfig] = {}
        self.vips: set[str] = set()
        self.agent_ids: dict[str, str] = {}  # aggregate id -> agent id
        self.queue_names: dict[str, str] = {}  # aggregate id -> queue name
        self._wanted_queue: dict[str, tuple[str, str]] = {}
        self._wanted_priority: dict[str, int] = {}  # the IVR's priority for a queued call
        # call sid -> conversation id, until the call ends
        self.calls: dict[str, str] = {}
        # callback id -> conversation id, until the callback is done (completed, cancelled
        # or failed: no event follows those)
        self.callbacks: dict[str, str] = {}
        self.callbacks_open: set[str] = set()
        self.presence: dict[str, str] = {}  # agent id -> available | away | offline
        self.handle_times = HandleTimes(clock=clock)
        # replaced whole after each round: read from other threads (the IVR's wait loop)
        self.voice_view = VoiceView({}, {}, {}, {})
        self._implicit: set[str] = set()
        self._to_release: set[str] = set()  # assigned conversations a call came into
        # offers the router withdrew when their agent left: recorded as lapsed
        self._withdrawn: list[tuple[str, str]] = []
        self.stats = RoundStats()
        # (when, conversation, stamp, kind, due_at, breach): the SLA timers
        self._timers: list[tuple[float, str, int, str, str, bool]] = []
        self._to_queue: set[str] = set()  # conversations waiting with no queue yet
        self._wake = asyncio.Event()
        self.states = states
        self.save_every = save_every
        # the position of the state saved or taken up last; 0: this state was built by
        # reading the log from its start, and none of its records was set aside yet
        self._saved_at = 0
        self._initial = routing_state.dump(self.router.settings, self._state())

    # -- its saved state -------------------------------------------------------------------

    @property
    def state_name(self) -> str:
        return "routing" if self.decide else "queue mirror"

    def restore(self) -> bool:
        """Takes up the last saved state, if this code can use it, before anything is read;
        False: there is none to take up, and the whole log will be read."""
        if self.states is None or self.position or self.caught_up:
            return False
        saved = self.states.latest(self.state_name)
        if saved is None:
            return False
        position, data = saved
        try:
            with gc_paused():
                state = routing_state.load(data, self.router.settings)
            if state.keys() != vars(self).keys() - _NOT_STATE or state["position"] != position:
                raise routing_state.UnreadableState("not a state of this distributor")
            reason = diverged(self.log, position, state["last_read"])
            if reason is not None:
                raise routing_state.UnreadableState(f"it {reason}")
        except routing_state.UnreadableState as exc:
            log.warning("%s: saved state not used (%s): reading the log", self.state_name, exc)
            return False
        vars(self).update(state)
        self.handle_times.use_clock(self.clock)
        self._saved_at = position
        log.info("%s: took up the state saved at position %d", self.state_name, position)
        return True

    def _state(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in _NOT_STATE}

    def save_state(self) -> bool:
        """Saves the state as of the position read so far (between rounds only). The routing
        process sets resolved conversations aside with it instead of keeping them in memory:
        most never change again, and one that does is read back before its event is
        applied."""
        if self.states is None or self.position == self._saved_at:
            return False
        settings = self.router.settings
        state = self._state()
        # Only the routing process, of which one runs: a queue mirror runs in every `inbox
        # serve`, and mirrors under one name would overwrite each other's records.
        resolved = [cid for cid, c in self.convs.items() if c.status == RESOLVED and self.decide]
        try:
            with gc_paused():
                set_aside = {
                    cid: routing_state.dump(settings, {_SET_ASIDE: self.convs[cid]})
                    for cid in resolved
                }
                state["convs"] = {cid: c for cid, c in self.convs.items() if cid not in set_aside}
                data = routing_state.dump(settings, state)
            self.states.save(
                self.state_name,
                self.position,
                data,
                set_aside,
                # a state read from the log's start does not follow from the saved one
                replace=self._saved_at == 0,
            )
        except _SAVE_ERRORS:
            # Only a slower restart is lost: it reads more of the log.
            log.warning("%s: could not save the state", self.state_name, exc_info=True)
            return False
        for cid in resolved:
            del self.convs[cid]
        self._saved_at = self.position
        return True

    def _take_back(self, events: list[Event]) -> str | None:
        """Reads back the conversations set aside that these events are about, before any of
        them is applied; or says why it cannot (a record missing, unreadable, or set aside
        after this state's position), and then nothing was changed."""
        if not self._saved_at or self.states is None:
            return None  # nothing was set aside since this state was read from the start
        convs = self.convs
        opened = {e.originator_id for e in events if e.name == "Conversation.Opened"}
        wanted = {
            e.originator_id
            for e in events
            if e.name.startswith("Conversation.")
            and e.originator_id not in convs
            and e.originator_id not in opened
        }
        if not wanted:
            return None
        found = self.states.set_aside(self.state_name, wanted)
        records: dict[str, ConversationState] = {}
        for cid in sorted(wanted):
            saved_at, data = found.get(cid, (None, b""))
            if saved_at is None:
                return f"conversation {cid} is neither kept nor set aside"
            if saved_at > self.position:
                return f"conversation {cid} was set aside after position {self.position}"
            try:
                record = routing_state.load(data, self.router.settings).get(_SET_ASIDE)
            except routing_state.UnreadableState as exc:
                return f"conversation {cid} set aside cannot be read: {exc}"
            if not isinstance(record, ConversationState):
                return f"conversation {cid} set aside is not a conversation's record"
            records[cid] = record
        convs.update(records)
        return None

    def _start_over(self, reason: str) -> None:
        """Drops the state and reads the whole log again: what a restart without a saved
        state does, and always right."""
        log.warning("%s: %s: reading the whole log again", self.state_name, reason)
        vars(self).update(routing_state.load(self._initial, self.router.settings))
        self.handle_times.use_clock(self.clock)
        self._saved_at = 0

    # -- reading the log -------------------------------------------------------------------

    def catch_up(self) -> int:
        """Applies everything stored since the last call; returns how many were read."""
        total = 0
        while True:
            records = read_log(self.log, self.position, self.batch_size)
            if not records:
                self.caught_up = True
                return total
            events = decode(records, HANDLES)
            lost = self._take_back(events)
            if lost is not None:
                self._start_over(lost)
                continue
            # (as in the projections: a collection would walk every conversation kept)
            with gc_paused():
                for event in events:
                    try:
                        self.apply(event)
                    except Exception:  # in memory only: a bug, or a value nobody expected
                        # Routing goes on for everyone else; a restart skips it the same way.
                        log.exception(
                            "%s: event %d (%s of %s) not applied",
                            self.state_name,
                            event.notification_id,
                            event.name,
                            event.originator_id,
                        )
            self.position = records[-1][0]
            self.last_read = record_id(records[-1])
            total += len(records)
            self.stats.read += len(records)

    def apply(self, e: Event) -> None:
        name, s = e.name, e.state
        if name.startswith("Agent."):
            self._agent_event(name, e.originator_id, s)
        elif name.startswith("Queue."):
            self._queue_event(e.originator_id, s)
        elif name == "Customer.VipChanged":
            (self.vips.add if s["vip"] else self.vips.discard)(e.originator_id)
        elif name == "Callback.Requested":
            self.callbacks[e.originator_id] = s["conversation_id"]
            self.callbacks_open.add(e.originator_id)
        elif name in ("Callback.Completed", "Callback.Cancelled"):
            self.callbacks_open.discard(e.originator_id)
            self.callbacks.pop(e.originator_id, None)
        elif name == "Callback.Failed":
            self.callbacks_open.discard(e.originator_id)
            # every attempt failed: the customer no longer waits for us
            cid = self.callbacks.pop(e.originator_id, "")
            failed = self.convs.get(cid)
            if failed is not None and failed.assignee is None:
                failed.waiting_since = None
                self.router.withdraw(cid)
        else:
            self._conversation_event(name, e.originator_id, s)

    def _agent_event(self, name: str, oid: str, s: dict[str, Any]) -> None:
        if name == "Agent.Registered":
            self.agent_ids[oid] = s["agent_id"]
        agent = self.agent_ids.get(oid)
        if agent is None:
            return
        if name == "Agent.PresenceChanged":
            self.presence[agent] = s["status"]
            self.router.set_presence(agent, s["status"], _seconds(s["at"]))
            if s["status"] != "available":
                # the router withdrew this agent's offers: the aggregates say so too
                for cid, c in self.convs.items():
                    if c.offered_to == agent:
                        self._withdrawn.append((cid, agent))
            return
        self.router.set_agent(
            AgentSpec(
                id=agent,
                skills=frozenset(s["skills"]),
                languages=frozenset(s["languages"]),
                capacity=dict(s["capacity"]),
            )
        )

    def _queue_event(self, oid: str, s: dict[str, Any]) -> None:
        if "name" in s:
            self.queue_names[oid] = s["name"]
        name = self.queue_names.get(oid)
        if name is None:
            return
        spec = s["spec"]
        self.queues[name] = QueueConfig.of(name, spec)
        self.router.set_queue(
            QueueSpec(
                name=name,
                skill=spec.get("skill"),
                channels=frozenset(spec.get("channels") or ()),
                language=spec.get("language"),
            )
        )

    def _conversation_event(self, name: str, cid: str, s: dict[str, Any]) -> None:
        at = s.get("at", "")
        if name == "Conversation.Opened":
            self.convs[cid] = ConversationState(
                customer=s["customer_id"],
                channel=s["channel"],
                queue=s.get("queue"),
                cycle_started_at=at,
            )
            return
        c = self.convs.get(cid)
        if c is None:
            return
        short = name.partition(".")[2]
        if short == "MessageReceived":
            if not s["automatic"]:
                c.channel = s["channel"]
                self._customer_waits(cid, c, at, s.get("via"), s.get("text") or "")
        elif short == "ActivityRecorded":
            activity = s["activity"]
            data = s.get("data") or {}
            call_sid = data.get("call_sid")
            self.handle_times.record(activity, data, parse_iso(at))
            if call_sid and activity in _ENDED_ACTIVITIES:
                # nobody asks for its place in the queue again (and every round walks these)
                self.calls.pop(call_sid, None)
            if activity in _WAITING_ACTIVITIES:
                c.channel = s["channel"]
                queue = priority = None
                if activity == "call.queued":
                    queue, priority = data.get("queue"), data.get("priority")
                    if call_sid:
                        self.calls[call_sid] = cid
                    if c.assignee is not None:
                        # a call into a conversation someone has (from an email, say) is
                        # routed afresh; the router prefers that agent when they are free
                        self._to_release.add(cid)
                self._customer_waits(cid, c, at, None, "", queue=queue, priority=priority)
            elif activity == "call.answered":
                c.waiting_since = None
            elif activity == "callback.requested" and call_sid:
                # virtual hold: the caller hangs up but keeps their place in the queue; a
                # callback asked for from the menu (never queued) joins the queue now
                c.callback_calls.add(call_sid)
                self._customer_waits(cid, c, at, None, "", queue=data.get("queue"))
            elif activity in _ENDED_ACTIVITIES and call_sid in c.callback_calls:
                pass  # the end of a call whose caller asked to be called back
            elif activity in _ENDED_ACTIVITIES and c.assignee is None:
                c.waiting_since = None
                self.router.withdraw(cid)
        elif short == "ReplyQueued":
            c.waiting_since = None
            if c.first_response_at is None:
                c.first_response_at = at
        elif short in ("Queued", "Transferred"):
            if short == "Transferred" and c.assignee is not None:
                self.router.released(cid, _seconds(at))
                c.assignee = None
            c.offered_to = None
            c.queue = s["queue"]
            if short == "Queued":
                c.priority = s["priority"]
            self._to_queue.discard(cid)
            self._enqueue(cid, c)
        elif short == "PriorityChanged":
            c.priority = s["priority"]
            self._enqueue(cid, c)
        elif short == "Offered":
            c.offered_to = s["agent"]
            expires = s.get("expires_at")
            self.router.offered(
                Offer(cid, s["agent"], None if expires is None else _seconds(expires), s["reason"]),
                _seconds(at),
            )
        elif short == "OfferLapsed":
            c.offered_to = None
            self.router.lapsed(cid, s["agent"], _seconds(at))
        elif short == "Assigned":
            if c.assignee is not None:
                self.router.released(cid, _seconds(at))
            c.assignee, c.offered_to = s["agent"], None
            if c.assignee is not None:
                self.router.assigned(cid, c.assignee, _seconds(at), channel=c.channel)
            else:
                self._enqueue(cid, c)
        elif short == "Resolved":
            c.status = RESOLVED
            c.waiting_since = c.offered_to = None
            if c.assignee is not None:
                self.router.released(cid, _seconds(at))
            else:
                self.router.withdraw(cid)
            self._to_queue.discard(cid)
        elif short == "Reopened":
            c.status = "open"
            c.cycle_started_at, c.first_response_at = at, None
            c.warned.clear()
            c.breached.clear()
            if c.assignee is not None:  # the agent who had it keeps the customer
                if c.queue is not None:  # so the router knows whose customer it is
                    self.router.enqueue(
                        cid,
                        queue=c.queue,
                        channel=c.channel,
                        priority=c.priority,
                        since=_seconds(at),
                        customer=c.customer,
                    )
                self.router.assigned(cid, c.assignee, _seconds(at), channel=c.channel)
        elif short == "SlaWarned":
            c.warned.add((s["kind"], s["due_at"]))
        elif short == "SlaBreached":
            c.breached.add((s["kind"], s["due_at"]))
        self._schedule_sla(cid, c)

    def _customer_waits(
        self,
        cid: str,
        c: ConversationState,
        at: str,
        via: str | None,
        text: str,
        *,
        queue: str | None = None,
        priority: int | None = None,
    ) -> None:
        if c.status == RESOLVED:
            c.status = "open"  # the Reopened event came first; kept in step anyway
        if c.waiting_since is None:
            c.waiting_since = at
        if queue is not None and queue != c.queue:
            self._to_queue.add(cid)
            self._wanted_queue[cid] = (queue, "IVR choice")
            if priority is not None:
                self._wanted_priority[cid] = int(priority)
        elif c.queue is None:
            self._to_queue.add(cid)
            self._wanted_queue[cid] = self._route_to(via, text, c.channel)
        else:
            self._enqueue(cid, c)

    def _route_to(self, via: str | None, text: str, channel: str) -> tuple[str, str]:
        """The queue a new conversation enters: the queue whose entry point it was sent to,
        then a keyword rule, then the default queue."""
        if via:
            wanted = via.lower()
            for q in sorted(self.queues.values(), key=lambda q: q.name):
                if wanted in q.spec.get("entry_points", ()):
                    return q.name, f"sent to {via}"
        lowered = text.lower()
        for q in sorted(self.queues.values(), key=lambda q: q.name):
            channels = q.spec.get("channels") or ()
            if channels and channel not in channels:
                continue
            for keyword in q.spec.get("keywords", ()):
                if keyword in lowered:
                    return q.name, f"keyword {keyword!r}"
        return DEFAULT_QUEUE, "default"

    def _enqueue(self, cid: str, c: ConversationState) -> None:
        if c.status == RESOLVED or c.assignee is not None or c.queue is None:
            return
        if c.waiting_since is None and c.offered_to is None:
            return  # nobody waits: an agent answered, or the customer has not written yet
        since = c.waiting_since or c.cycle_started_at
        if c.queue not in self.queues and c.queue not in self._implicit:
            # a queue nobody defined (the default, an IVR or escalation queue): any agent
            self.router.set_queue(QueueSpec(name=c.queue))
            self._implicit.add(c.queue)
        self.router.enqueue(
            cid,
            queue=c.queue,
            channel=c.channel,
            priority=c.priority,
            since=_seconds(since),
            customer=c.customer,
            language=None,
        )

    # -- SLA clocks ------------------------------------------------------------------------

    def _schedule_sla(self, cid: str, c: ConversationState) -> None:
        c.sla_stamp += 1
        due = self.sla_due(c)
        if due is None:
            return
        kind, due_at = due.kind, iso(due.due_at)
        if (kind, due_at) not in c.warned and (kind, due_at) not in c.breached:
            heapq.heappush(
                self._timers, (due.warn_at.timestamp(), cid, c.sla_stamp, kind, due_at, False)
            )
        if (kind, due_at) not in c.breached:
            heapq.heappush(
                self._timers, (due.due_at.timestamp(), cid, c.sla_stamp, kind, due_at, True)
            )

    def sla_due(self, c: ConversationState) -> SlaClock | None:
        if c.status == RESOLVED or c.queue is None:
            return None
        config = self.queues.get(c.queue)
        if config is None or config.policy is None:
            return None
        clocks = running_clocks(
            config.policy,
            c.priority,
            opened_at=parse_iso(c.cycle_started_at),
            first_response_at=None
            if c.first_response_at is None
            else parse_iso(c.first_response_at),
            waiting_since=None if c.waiting_since is None else parse_iso(c.waiting_since),
            resolved=False,
        )
        return earliest_due(clocks)

    def _sla_round(self, now: float) -> int:
        recorded = 0
        while self._timers and self._timers[0][0] <= now:
            _, cid, stamp, kind, due_at, breach = heapq.heappop(self._timers)
            c = self.convs.get(cid)
            if c is None or c.sla_stamp != stamp:
                continue  # the conversation moved on: its clocks were scheduled again
            seen = c.breached if breach else c.warned
            if (kind, due_at) in seen:
                continue
            seen.add((kind, due_at))
            recorded += self._sla_event(cid, c, kind, due_at, breach=breach)
        return recorded

    def _sla_event(
        self, cid: str, c: ConversationState, kind: str, due: str, *, breach: bool
    ) -> int:
        config = self.queues.get(c.queue or "")
        actions_of = (config.spec.get("sla_actions") if config else None) or {}
        actions = actions_of.get("breach" if breach else "warning", [])
        escalation_queue = (
            config.spec.get("escalation_queue") if config else None
        ) or "escalations"

        def act(conversation: Conversation, at: str) -> None:
            conversation.record_sla(kind, due, breached=breach, actor=ROUTER, at=at)
            if "raise_priority" in actions and conversation.priority < MAX_PRIORITY:
                conversation.change_priority(
                    conversation.priority + 1,
                    reason=f"SLA {kind} {'breached' if breach else 'nearing'}",
                    actor=ROUTER,
                    at=at,
                )
            if "reassign" in actions and conversation.assignee is not None:
                conversation.assign(None, actor=ROUTER, at=at)
            if "escalate" in actions and conversation.queue != escalation_queue:
                conversation.transfer(escalation_queue, actor=ROUTER, at=at)

        return self._record(cid, act)

    # -- deciding and recording ------------------------------------------------------------

    def _record(self, cid: str, act: Callable[[Conversation, str], None]) -> int:
        """Decides on the current aggregate and saves; 0 when the state no longer allows it."""
        for _ in range(3):
            conversation = self.store.get(UUID(cid))
            if not isinstance(conversation, Conversation):
                return 0
            try:
                act(conversation, iso(self.clock()))
                self.store.save(conversation)
            except IntegrityError:
                continue  # changed meanwhile: decide again on fresh state
            except DomainError as exc:
                log.info("distribution: %s: %s", cid, exc)
                self.stats.dropped += 1
                return 0
            self.stats.recorded += 1
            return 1
        return 0

    def _queue_new(self) -> int:
        recorded = 0
        for cid in sorted(self._to_queue):
            c = self.convs.get(cid)
            wanted = self._wanted_queue.pop(cid, None)
            if c is None or wanted is None or c.status == RESOLVED:
                continue
            queue, reason = wanted
            priority = max(self._priority_for(queue, c), self._wanted_priority.pop(cid, 0))

            def act(
                conversation: Conversation,
                at: str,
                q: str = queue,
                r: str = reason,
                p: int = priority,
            ) -> None:
                # (min: a priority of 10 stored before the range was 0-9 everywhere)
                priority = min(MAX_PRIORITY, max(p, conversation.priority))
                conversation.enter_queue(q, priority, reason=r, actor=ROUTER, at=at)

            recorded += self._record(cid, act)
        self._clear_to_queue()
        return recorded

    def _clear_to_queue(self) -> None:
        # What is wanted for a conversation queued meanwhile by someone else goes too: a new
        # wait asks again.
        self._to_queue.clear()
        self._wanted_queue.clear()
        self._wanted_priority.clear()

    def _priority_for(self, queue: str, c: ConversationState) -> int:
        config = self.queues.get(queue)
        base = int(config.spec.get("priority", 0)) if config else 0
        return max(base, VIP_PRIORITY) if c.customer in self.vips else base

    def _offer(self, offer: Offer) -> int:
        def act(conversation: Conversation, at: str) -> None:
            if offer.expires_at is None:
                conversation.assign(offer.agent, actor=ROUTER, at=at, claim=True)
            else:
                conversation.offer(
                    offer.agent, expires_at=_iso(offer.expires_at), reason=offer.reason, at=at
                )

        done = self._record(offer.item, act)
        if not done:
            self._resync(offer.item)
        return done

    def _lapse(self, lapsed: OfferLapsed) -> int:
        done = self._record(
            lapsed.item,
            lambda c, at: c.lapse_offer(
                lapsed.agent, reason="not accepted in time", actor=ROUTER, at=at
            ),
        )
        if lapsed.make_away:
            try:
                self.directory.set_presence(
                    lapsed.agent, "away", reason=f"missed {lapsed.misses} offers", actor=ROUTER
                )
                done += 1
            except (LookupError, DomainError, IntegrityError) as exc:
                log.warning("distribution: could not make %s away: %s", lapsed.agent, exc)
        return done

    def _release(self, cid: str) -> int:
        c = self.convs.get(cid)
        if c is None or c.assignee is None or c.status == RESOLVED:
            return 0

        def act(conversation: Conversation, at: str) -> None:
            conversation.assign(None, actor=ROUTER, at=at)

        return self._record(cid, act)

    def _withdraw(self, cid: str, agent: str) -> int:
        c = self.convs.get(cid)
        if c is None or c.offered_to != agent:
            return 0  # lapsed or taken since

        def act(conversation: Conversation, at: str) -> None:
            conversation.lapse_offer(agent, reason="agent left", actor=ROUTER, at=at)

        return self._record(cid, act)

    def _resync(self, cid: str) -> None:
        """A decision that could not be recorded: the router forgets it and takes the item
        back as the store has it (the log will tell the rest)."""
        self.router.withdraw(cid)
        c = self.convs.get(cid)
        if c is not None:
            self._enqueue(cid, c)

    def step(self) -> int:
        """One round: read the log, then decide (once caught up). Returns events recorded."""
        self.catch_up()
        now = self.clock().timestamp()
        if not self.decide:
            # A mirror's to-do lists are the routing process's to do; what it does comes
            # back through the log.
            self._clear_to_queue()
            self._to_release.clear()
            self._withdrawn.clear()
            self.update_gauges(now)
            return 0
        recorded = self._queue_new()
        for cid in sorted(self._to_release):
            recorded += self._release(cid)
        self._to_release.clear()
        withdrawn, self._withdrawn = self._withdrawn, []
        for cid, agent in withdrawn:
            recorded += self._withdraw(cid, agent)
        if recorded:
            self.catch_up()  # the router learns the new queue entries before deciding
        for lapsed in self.router.expire(now):
            recorded += self._lapse(lapsed)
        for offer in self.router.decide(now):
            recorded += self._offer(offer)
        recorded += self._sla_round(now)
        self.update_gauges(now)
        return recorded

    def update_gauges(self, now: float) -> None:
        """The live Prometheus gauges: queue depth and longest wait, agents by presence,
        callbacks pending."""
        for queue in sorted({*self.queues, *self._implicit}):
            telemetry.QUEUE_DEPTH.labels(queue).set(self.router.depth(queue))
            longest = self.router.longest_wait(queue, now)
            telemetry.QUEUE_LONGEST_WAIT.labels(queue).set(longest or 0.0)
        counts = dict.fromkeys(("available", "away", "offline"), 0)
        for agent in self.agent_ids.values():
            status = self.presence.get(agent, "offline")
            counts[status] = counts.get(status, 0) + 1
        for status, count in counts.items():
            telemetry.AGENTS.labels(status).set(count)
        telemetry.CALLBACKS_PENDING.set(len(self.callbacks_open))
        queues = sorted({*self.queues, *self._implicit})
        positions = {}
        for call_sid, cid in self.calls.items():
            position = self.router.position(cid)
            if position is not None:
                positions[call_sid] = position
        self.voice_view = VoiceView(
            positions=positions,
            staffing={q: self.router.staffing(q) for q in queues},
            depth={q: self.router.depth(q) for q in queues},
            handle_times={q: self.handle_times.recent(q) for q in ["", *queues]},
        )

    def queue_info(self, call_sid: str, queue: str) -> tuple[int, float | None, int]:
        """(position, estimated wait in seconds or None, agents free) of a caller, from the
        last round's picture; a call not seen yet in the log counts as last in the queue."""
        view = self.voice_view
        position = view.positions.get(call_sid) or view.depth.get(queue, 0) + 1
        free, busy = view.staffing.get(queue, (0, 0))
        estimate = estimate_wait(
            position=position,
            free_agents=free,
            busy_agents=busy,
            handle_times=view.handle_times.get(queue) or view.handle_times.get("", []),
        )
        return position, estimate, free

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (self.router.next_deadline(), self._timers[0][0] if self._timers else None)
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    # -- running ---------------------------------------------------------------------------

    def nudge(self) -> None:
        """Something was just stored: look at once (safe from any thread via the loop)."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wake.set)

    _loop: asyncio.AbstractEventLoop | None = None

    async def run(
        self,
        stop: asyncio.Event,
        *,
        poll_interval: float = 0.05,
        stored: Callable[[], None] = lambda: None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        if self.states is not None:
            try:
                await asyncio.to_thread(self.restore)
            except DatabaseError:  # the table cannot be read: the log can
                log.warning("%s: no saved state read", self.state_name, exc_info=True)
        await self._run(stop, poll_interval, stored)
        # Only after a round ended: a cancelled one may still be changing the state in its
        # thread, and the last save stands (a restart then reads a little more of the log).
        await asyncio.to_thread(self.save_state)

    async def _run(
        self, stop: asyncio.Event, poll_interval: float, stored: Callable[[], None]
    ) -> None:
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                recorded = await asyncio.to_thread(self.step)
                failures = 0
            except Exception:  # a lost database connection: log, wait, carry on
                log.exception("distribution round failed")
                recorded = 0
                failures = min(failures + 1, 10)
            if recorded:
                stored()
                continue  # what we recorded comes back through the log: read it now
            if self.caught_up and self.position - self._saved_at >= self.save_every:
                await asyncio.to_thread(self.save_state)
            # failing rounds back off (to 5 s), instead of a traceback every poll
            timeout = min(5.0, poll_interval * 2**failures) if failures else poll_interval
            deadline = self.next_deadline()
            if deadline is not None and not failures:
                timeout = max(0.0, min(timeout, deadline - self.clock().timestamp()))
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            _, pending = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()


__all__ = ["Distributor"]
