"""Routing: which waiting item is offered to which agent, and when.

The router is in-memory state rebuilt from the event log. A service calls the methods below as
events arrive and records what `decide` and `expire` return as events, which come back through
the log (`offered`, `lapsed`). Every decision is a pure function of the state and `now`, ties are
broken by stable keys, so replaying the log gives the same state and no new decisions.

Waiting items live in buckets keyed (queue, channel, item language): every item of a bucket
needs the same agents. Each bucket has a heap of its waiting items (lazy deletion by token),
the set of agents statically eligible for it (skill, languages, capacity on its channel) and a
sorted list of those that can take an offer now (available, free capacity), in the order the
router prefers them. `decide` only looks at buckets marked since the last call ("dirty"): an
item arrived or came back, an agent freed capacity or changed presence, a sticky wait ended.
A bucket that is not dirty has nothing to offer, so deciding over the dirty ones equals
deciding over all of them.

Own decisions come back: `decide` applies its offers at once and remembers them until the log
returns them (`offered`), which then changes nothing, even if the offer lapsed or was withdrawn
meanwhile. An offer read from the log that the router did not make here (replay, another
instance) applies only if it still could be made (item waiting, agent available, eligible,
with free capacity), so an offer overtaken in the log by a presence change, a capacity cut or
a transfer resolves the same way live and on replay. `lapsed` only lapses an offer that had
expired by its `at`, never a newer offer of the same item.

Rules (the issue's, plus the choices this module made):
- Items in order: highest priority, then oldest `since`, then item id; across the buckets an
  agent serves, the best item goes first.
- Agent for an item: the agent who last served the customer (released less than
  `sticky_window` seconds before `now`) when free; with `sticky_wait` > 0 and that agent
  available but full, the item waits until `since + sticky_wait` (items behind it go on);
  then the least loaded (load + outstanding offers on the channel ÷ capacity, then absolute),
  then the longest idle, then agent id.
- An item is not offered again to an agent whose offer for it lapsed, unless every other
  available eligible agent lapsed it too (then the item would wait forever): it goes back to
  them, reason "only agent left".
- An agent whose misses reached `max_misses` gets no offers until it becomes available again
  (the service records it as away), and its other outstanding offers are withdrawn at once.
- Capacity: an offer is made only while load + outstanding offers < capacity on the channel.
  `assigned` records a fact and may exceed capacity (a supervisor's manual assignment, a
  capacity cut); the router then makes no offers to that agent on that channel.
- `depth` and `position` count items not yet assigned, offered ones included: the customer
  still waits.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Stale entries (a bucket's heap, the customers' last agents) are dropped when their number
# doubles what is left, from at least this many: amortised O(1) a push.
_COMPACT_MIN = 64

AVAILABLE = "available"
AWAY = "away"
OFFLINE = "offline"
PRESENCES = frozenset({AVAILABLE, AWAY, OFFLINE})

# Channels that share one "messaging" capacity unless the agent names them one by one.
MESSAGING_CHANNELS = frozenset({"sms", "whatsapp", "messenger", "instagram"})

WAITING = "waiting"
OFFERED = "offered"
ASSIGNED = "assigned"

STICKY = "sticky"
LEAST_LOADED = "least loaded"
LONGEST_IDLE = "longest idle"
AGENT_ID = "agent id"
ONLY_FREE_AGENT = "only free agent"
ONLY_AGENT_LEFT = "only agent left"

BucketKey = tuple[str, str, str]  # (queue, channel, item language or "")
AgentKey = tuple[float, int, float, str]  # (load ratio, load, idle since, agent id)
ItemKey = tuple[int, float, str]  # (-priority, since, item id)
HeapEntry = tuple[int, float, str, int]  # ItemKey + token


@dataclass(frozen=True)
class QueueSpec:
    name: str
    skill: str | None = None  # agents need this skill (None: any agent)
    channels: frozenset[str] = frozenset()  # empty: any channel
    language: str | None = None  # agents need this language (None: any)


@dataclass(frozen=True)
class AgentSpec:
    id: str
    skills: frozenset[str]
    languages: frozenset[str]
    capacity: Mapping[str, int]  # per channel; see `capacity`


@dataclass(frozen=True)
class Offer:
    item: str
    agent: str
    expires_at: float | None  # None: a direct assignment (a channel without offer timeout)
    reason: str  # why this agent: "sticky", "least loaded", "longest idle", ...


@dataclass(frozen=True)
class OfferLapsed:
    item: str
    agent: str
    misses: int  # consecutive misses of this agent
    make_away: bool  # misses reached max_misses: the service records the agent as away


@dataclass(frozen=True)
class RouterSnapshot:
    """What replay must reproduce: waiting order, outstanding offers, loads, misses."""

    queues: dict[str, tuple[str, ...]]
    offers: tuple[Offer, ...]
    loads: dict[str, dict[str, int]]
    misses: dict[str, int]
    presence: dict[str, str]


def capacity(spec: AgentSpec, channel: str) -> int:
    if channel in spec.capacity:
        return spec.capacity[channel]
    if channel in MESSAGING_CHANNELS:
        return spec.capacity.get("messaging", 0)
    return 0


@dataclass(slots=True)
class _Item:
    id: str
    queue: str
    channel: str | None  # None: assigned without ever being enqueued, channel unknown
    priority: int
    since: float
    customer: str | None
    language: str | None
    state: str = WAITING
    agent: str | None = None  # offered to, or held by
    offer: Offer | None = None
    seq: int = 0  # when the current offer was made: capacity cuts withdraw the newest first
    token: int = 0  # heap entries with another token are stale (router-wide: unique)
    lapsed: dict[str, float] = field(default_factory=dict)  # agent -> expiry of its lapsed offer

    @property
    def key(self) -> ItemKey:
        return (-self.priority, self.since, self.id)

    @property
    def bucket(self) -> BucketKey:
        assert self.channel is not None
        return (self.queue, self.channel, self.language or "")


@dataclass(slots=True)
class _Agent:
    spec: AgentSpec
    presence: str = OFFLINE
    idle_since: float = 0.0
    misses: int = 0
    load: dict[str, int] = field(default_factory=dict)  # assigned items per channel
    offers: dict[str, dict[str, int]] = field(default_factory=dict)  # channel -> item -> seq
    held: set[str] = field(default_factory=set)  # assigned items
    buckets: dict[str, set[BucketKey]] = field(default_factory=dict)  # channel -> eligible
    keys: dict[str, AgentKey] = field(default_factory=dict)  # channel -> key in free lists
    attached: bool = True  # False while a change re-places it in the free lists wholesale

    def used(self, channel: str) -> int:
        return self.load.get(channel, 0) + len(self.offers.get(channel, ()))


@dataclass(slots=True)
class _Bucket:
    heap: list[HeapEntry] = field(default_factory=list)
    eligible: set[str] = field(default_factory=set)
    free: list[AgentKey] = field(default_factory=list)  # sorted: the preferred agent first
    # The heap's length that makes it drop its stale entries: those below the head are only
    # met when they reach the top, which an item that waits long keeps them from.
    compact_at: int = _COMPACT_MIN


class Router:
    def __init__(
        self,
        *,
        offer_timeouts: Mapping[str, float] = {
            "voice": 20.0,
            "chat": 30.0,
        },  # copied, never mutated
        sticky_window: float = 7 * 86400.0,
        sticky_wait: float = 0.0,
        max_misses: int = 3,
    ) -> None:
        self._timeouts = dict(offer_timeouts)
        self._sticky_window = sticky_window
        self._sticky_wait = sticky_wait
        self._max_misses = max_misses
        self._queues: dict[str, QueueSpec] = {}
        self._agents: dict[str, _Agent] = {}
        self._items: dict[str, _Item] = {}
        self._buckets: dict[BucketKey, _Bucket] = {}
        self._dirty: set[BucketKey] = set()
        self._served: dict[str, tuple[str, float]] = {}  # customer -> (agent, released at)
        self._served_compact_at = _COMPACT_MIN
        self._expiry: list[tuple[float, str, str, int]] = []  # (expires_at, item, agent, seq)
        self._wakeups: list[tuple[float, BucketKey]] = []  # sticky waits ending
        self._wakeup_set: set[tuple[float, BucketKey]] = set()
        self._by_queue: dict[str, list[ItemKey]] = {}  # unassigned items, in queue order
        self._since: dict[str, list[tuple[float, str]]] = {}  # unassigned items, oldest first
        self._echo: dict[str, list[Offer]] = {}  # own offers not yet seen back from the log
        self._seq = 0

    @property
    def settings(self) -> tuple[Any, ...]:
        """What it was made with (a saved router state is only used with the same)."""
        return (
            sorted(self._timeouts.items()),
            self._sticky_window,
            self._sticky_wait,
            self._max_misses,
        )

    # ---- configuration -------------------------------------------------------------------

    def set_queue(self, spec: QueueSpec) -> None:
        if self._queues.get(spec.name) == spec:
            return
        self._queues[spec.name] = spec
        keys = [k for k in self._buckets if k[0] == spec.name]
        if keys:
            self._reindex(list(self._agents.values()), keys)

    def set_agent(self, spec: AgentSpec) -> None:
        agent = self._agents.get(spec.id)
        if agent is None:
            agent = self._agents[spec.id] = _Agent(spec)
        elif agent.spec == spec:
            return
        agent.spec = spec
        self._reindex([agent], list(self._buckets))

    def set_presence(self, agent: str, status: str, at: float) -> None:
        if status not in PRESENCES:
            raise ValueError(f"unknown presence {status!r}")
        a = self._agent(agent)
        if a.presence == status:
            return
        self._detach(a)
        was_available, a.presence = a.presence == AVAILABLE, status
        if was_available:
            for item in self._offered_items(a):
                self._withdraw_offer(item)
        if status == AVAILABLE:
            # A fresh start: earlier misses no longer count, the idle clock starts now.
            a.misses = 0
            a.idle_since = at
        self._attach(a)

    # ---- items ---------------------------------------------------------------------------

    def enqueue(
        self,
        item: str,
        *,
        queue: str,
        channel: str,
        priority: int,
        since: float,
        customer: str | None = None,
        language: str | None = None,
    ) -> None:
        """Idempotent. On an item already known every field is taken from the call (a
        transfer or priority raise passes the original `since` to keep its place). An offer
        outstanding stays if its agent can still take the item. An item an agent holds is let
        go (as by `released`, without stickiness) and waits again."""
        it = self._items.get(item)
        if it is None:
            it = self._items[item] = _Item(
                item, queue, channel, priority, since, customer, language
            )
            self._index_add(it)
            self._push(it)
            return
        fields = (queue, channel, priority, since, customer, language)
        current = (it.queue, it.channel, it.priority, it.since, it.customer, it.language)
        if it.state != ASSIGNED and fields == current:
            return
        if it.state == ASSIGNED:
            self._let_go(it, at=None)
        else:
            self._index_remove(it)
        kept = (it.offer, it.seq, self._cancel(it)) if it.state == OFFERED else None
        it.queue, it.channel, it.priority, it.since = queue, channel, priority, since
        it.customer, it.language = customer, language
        self._index_add(it)
        if kept is not None and kept[0] is not None and self._fits(it, kept[2]):
            self._place(it, kept[2], kept[0], kept[1])  # its agent can still take it
        else:
            self._push(it)

    def withdraw(self, item: str) -> None:
        """The item no longer waits: its offer is cancelled, it is forgotten. An item an
        agent holds frees that capacity (without stickiness: use `released` for that)."""
        it = self._items.get(item)
        if it is None:
            return
        if it.state == ASSIGNED:
            self._let_go(it, at=None)
        else:
            if it.state == OFFERED:
                self._cancel(it)
            self._index_remove(it)
        self._forget(it)

    def assigned(self, item: str, agent: str, at: float, *, channel: str | None = None) -> None:
        """The agent took the item (offer accepted or manual assignment). Idempotent."""
        it = self._items.get(item)
        if it is None:
            it = self._items[item] = _Item(item, "", channel, 0, at, None, None, state=ASSIGNED)
        elif it.state == ASSIGNED:
            if it.agent == agent:
                return
            self._let_go(it, at=None)  # reassigned without a release first
            it.state = ASSIGNED
        else:
            if it.state == OFFERED:
                accepted = it.agent == agent
                self._cancel(it)
                if accepted:
                    self._agent(agent).misses = 0
            it.token = self._next_seq()
            it.state = ASSIGNED
            self._index_remove(it)
        self._echo.pop(item, None)
        it.agent = agent
        a = self._agent(agent)
        a.held.add(item)
        if it.channel is not None:
            a.load[it.channel] = a.load.get(it.channel, 0) + 1
            self._refresh(a, (it.channel,))

    def released(self, item: str, at: float) -> None:
        """The agent finished with the item: frees the capacity at once, remembers who served
        the customer, and forgets the item (a transfer enqueues it again)."""
        it = self._items.get(item)
        if it is None or it.state != ASSIGNED:
            return
        if it.customer is not None and it.agent is not None:
            self._served[it.customer] = (it.agent, at)
            if len(self._served) > self._served_compact_at:
                # only releases within the window make an agent sticky (`_sticky`)
                since = at - self._sticky_window
                self._served = {c: s for c, s in self._served.items() if s[1] > since}
                self._served_compact_at = max(_COMPACT_MIN, 2 * len(self._served))
        self._let_go(it, at=at)
        self._forget(it)

    # ---- decisions recorded in the log --------------------------------------------------------

    def offered(self, offer: Offer, at: float) -> None:
        """An offer read back from the log. The router's own offer is already applied (and
        may since have lapsed or been withdrawn); another one applies if it still can."""
        it = self._items.get(offer.item)
        if it is None or it.state == ASSIGNED:
            return
        own = self._echo.get(offer.item)
        match = next((o for o in own or () if _same(o, offer)), None)
        if own is not None and match is not None:
            own.remove(match)
            if not own:
                del self._echo[offer.item]
            return
        if it.state == OFFERED:
            return  # the same offer again, or one the log decided otherwise: first one wins
        a = self._agents.get(offer.agent)
        if a is None or not self._fits(it, a):
            return
        self._place(it, a, offer, self._next_seq())

    def lapsed(self, item: str, agent: str, at: float) -> None:
        """An offer recorded as lapsed. Idempotent: only an outstanding offer to that agent
        that had expired by `at` lapses (not a newer offer of the same item)."""
        it = self._items.get(item)
        if it is None or it.state != OFFERED or it.agent != agent or it.offer is None:
            return
        expires_at = it.offer.expires_at
        if expires_at is not None and expires_at <= at:
            self._lapse(it)

    # ---- deciding ---------------------------------------------------------------------------

    def decide(self, now: float) -> list[Offer]:
        """Every offer that can be made now, applied to the state (capacity reserved)."""
        while self._wakeups and self._wakeups[0][0] <= now:
            wakeup = heapq.heappop(self._wakeups)
            self._wakeup_set.discard(wakeup)
            self._dirty.add(wakeup[1])
        heads: list[tuple[ItemKey, BucketKey]] = []
        for key in self._dirty:
            bucket = self._buckets[key]
            head = self._head(bucket)
            if head is not None and bucket.free:
                heads.append((head, key))
        self._dirty.clear()
        heapq.heapify(heads)
        offers: list[Offer] = []
        skipped: list[tuple[_Bucket, HeapEntry]] = []
        # Merge the buckets' queues: the best item of all goes first.
        while heads:
            _, key = heapq.heappop(heads)
            bucket = self._buckets[key]
            if not bucket.free:
                continue  # its agents were taken by better items elsewhere
            entry = heapq.heappop(bucket.heap)
            it = self._items[entry[2]]
            offer = self._choose(it, bucket, now)
            if offer is None:
                skipped.append((bucket, entry))
            else:
                self._place(it, self._agents[offer.agent], offer, self._next_seq())
                self._echo.setdefault(it.id, []).append(offer)
                offers.append(offer)
            head = self._head(bucket)
            if head is not None and bucket.free:
                heapq.heappush(heads, (head, key))
        for bucket, entry in skipped:
            heapq.heappush(bucket.heap, entry)
        return offers

    def expire(self, now: float) -> list[OfferLapsed]:
        """Offers past their expiry lapse: the item waits again at its place, the agent
        misses one more."""
        lapsed: list[OfferLapsed] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, item, agent, seq = heapq.heappop(self._expiry)
            it = self._items.get(item)
            if it is None or it.state != OFFERED or it.agent != agent or it.seq != seq:
                continue
            misses = self._lapse(it)
            lapsed.append(OfferLapsed(item, agent, misses, misses >= self._max_misses))
        return lapsed

    def next_deadline(self) -> float | None:
        """The earliest offer expiry or sticky-wait end (sticky waits are known once a
        `decide` has seen them)."""
        while self._expiry and not self._expiry_valid(self._expiry[0]):
            heapq.heappop(self._expiry)
        times = [q[0][0] for q in (self._expiry, self._wakeups) if q]
        return min(times) if times else None

    def rescan(self) -> None:
        """Make the next `decide` look at every bucket (a full sweep: for checks and tests)."""
        self._dirty.update(self._buckets)

    # ---- read side --------------------------------------------------------------------------

    def depth(self, queue: str) -> int:
        return len(self._by_queue.get(queue, ()))

    def longest_wait(self, queue: str, now: float) -> float | None:
        oldest = self._since.get(queue)
        return now - oldest[0][0] if oldest else None

    def position(self, item: str) -> int | None:
        it = self._items.get(item)
        if it is None or it.state == ASSIGNED:
            return None
        return bisect_left(self._by_queue[it.queue], it.key) + 1

    def staffing(self, queue: str) -> tuple[int, int]:
        """(available agents with free capacity, available but full) eligible for the queue."""
        spec = self._queues.get(queue)
        if spec is None:
            return (0, 0)
        free = busy = 0
        for a in self._agents.values():
            if a.presence != AVAILABLE or not _serves(spec, a.spec):
                continue
            channels = spec.channels or frozenset(a.spec.capacity) | MESSAGING_CHANNELS
            caps = [(c, capacity(a.spec, c)) for c in channels]
            caps = [(c, n) for c, n in caps if n > 0]
            if not caps:
                continue
            if any(a.used(c) < n for c, n in caps):
                free += 1
            else:
                busy += 1
        return (free, busy)

    def load(self, agent: str, channel: str) -> int:
        a = self._agents.get(agent)
        return a.load.get(channel, 0) if a else 0

    def outstanding(self) -> list[Offer]:
        """Offers not yet accepted, lapsed or withdrawn, by item id."""
        return sorted(
            (it.offer for it in self._items.values() if it.offer is not None),
            key=lambda o: o.item,
        )

    def snapshot(self) -> RouterSnapshot:
        return RouterSnapshot(
            queues={
                q: tuple(k[2] for k in keys) for q, keys in sorted(self._by_queue.items()) if keys
            },
            offers=tuple(self.outstanding()),
            loads={
                aid: {c: n for c, n in sorted(a.load.items()) if n}
                for aid, a in sorted(self._agents.items())
            },
            misses={aid: a.misses for aid, a in sorted(self._agents.items())},
            presence={aid: a.presence for aid, a in sorted(self._agents.items())},
        )

    # ---- choosing an agent --------------------------------------------------------------------

    def _choose(self, it: _Item, bucket: _Bucket, now: float) -> Offer | None:
        channel = it.channel
        assert channel is not None
        expires_at = now + self._timeouts[channel] if channel in self._timeouts else None
        sticky = self._sticky(it, bucket, now)
        if sticky is not None:
            agent, served_at = sticky
            if self._agents[agent].keys.get(channel) is not None:
                return Offer(it.id, agent, expires_at, STICKY)
            if self._sticky_wait > 0 and now < it.since + self._sticky_wait:
                # Wait for them; the bucket wakes when the wait ends or the window closes.
                self._wake_at(
                    min(it.since + self._sticky_wait, served_at + self._sticky_window), it
                )
                return None
        picked = self._pick(it, bucket)
        if picked is None:
            return None
        return Offer(it.id, picked[0], expires_at, picked[1])

    def _sticky(self, it: _Item, bucket: _Bucket, now: float) -> tuple[str, float] | None:
        """The agent who last served the customer, if within the window and able to serve
        this item (eligible, available, not having let this very item lapse)."""
        if it.customer is None:
            return None
        served = self._served.get(it.customer)
        if served is None or now >= served[1] + self._sticky_window:
            return None
        agent = served[0]
        if agent not in bucket.eligible or agent in it.lapsed:
            return None
        if not self._offerable(self._agents[agent]):
            return None
        return served

    def _pick(self, it: _Item, bucket: _Bucket) -> tuple[str, str] | None:
        """The first free agent in preference order, skipping those who let this item
        lapse; the reason compares it with the runner-up."""
        allow_lapsed: bool | None = None
        chosen: AgentKey | None = None
        for key in bucket.free:
            if key[3] in it.lapsed:
                if allow_lapsed is None:
                    allow_lapsed = not self._others(bucket, it.lapsed)
                if not allow_lapsed:
                    continue
            if chosen is None:
                chosen = key
                continue
            return chosen[3], _reason(chosen, key, retry=chosen[3] in it.lapsed)
        if chosen is None:
            return None
        return chosen[3], ONLY_AGENT_LEFT if chosen[3] in it.lapsed else ONLY_FREE_AGENT

    def _others(self, bucket: _Bucket, lapsed: Mapping[str, float]) -> bool:
        """Whether an available eligible agent who did not let the item lapse exists."""
        return any(
            aid not in lapsed and self._offerable(self._agents[aid]) for aid in bucket.eligible
        )

    def _offerable(self, a: _Agent) -> bool:
        return a.presence == AVAILABLE and a.misses < self._max_misses

    def _key(self, a: _Agent, channel: str) -> AgentKey | None:
        """The agent's place in the free lists of the channel, or None when it takes no offer."""
        if not self._offerable(a):
            return None
        cap = capacity(a.spec, channel)
        used = a.used(channel)
        if used >= cap:
            return None
        return (used / cap, used, a.idle_since, a.spec.id)

    # ---- state changes ------------------------------------------------------------------------

    def _place(self, it: _Item, a: _Agent, offer: Offer, seq: int) -> None:
        assert it.channel is not None
        it.state, it.agent, it.offer, it.seq = OFFERED, a.spec.id, offer, seq
        it.token = self._next_seq()
        a.offers.setdefault(it.channel, {})[it.id] = seq
        if offer.expires_at is not None:
            heapq.heappush(self._expiry, (offer.expires_at, it.id, a.spec.id, seq))
        self._refresh(a, (it.channel,))

    def _cancel(self, it: _Item) -> _Agent:
        """Take the outstanding offer back from its agent (the item is not pushed)."""
        assert it.agent is not None
        assert it.channel is not None
        a = self._agents[it.agent]
        del a.offers[it.channel][it.id]
        it.state, it.agent, it.offer = WAITING, None, None
        self._refresh(a, (it.channel,))
        return a

    def _withdraw_offer(self, it: _Item) -> None:
        self._cancel(it)
        self._push(it)

    def _lapse(self, it: _Item) -> int:
        assert it.offer is not None
        assert it.offer.expires_at is not None
        it.lapsed[it.offer.agent] = it.offer.expires_at
        a = self._agents[it.offer.agent]
        a.misses += 1
        self._cancel(it)
        self._push(it)
        if a.misses >= self._max_misses:
            # It is about to be made away: its other offers go back now (as the away would
            # do), so live and replay agree whenever the service records the away.
            self._detach(a)
            for other in self._offered_items(a):
                self._withdraw_offer(other)
            self._attach(a)  # no more offers to it: others may now get the items it lapsed
        return a.misses

    def _fits(self, it: _Item, a: _Agent) -> bool:
        """Whether the item may be offered to the agent (the log's offers are checked too)."""
        if it.state != WAITING or it.channel is None or a.presence != AVAILABLE:
            return False
        if it.bucket not in a.buckets.get(it.channel, ()):
            return False
        return a.used(it.channel) < capacity(a.spec, it.channel)

    def _let_go(self, it: _Item, at: float | None) -> None:
        """The agent no longer holds the item: its capacity is free at once."""
        assert it.agent is not None
        a = self._agents[it.agent]
        a.held.discard(it.id)
        it.state, it.agent = WAITING, None
        if it.channel is not None:
            a.load[it.channel] -= 1
        if not a.held and at is not None:
            a.idle_since = at
            self._detach(a)  # the idle clock is in every key of the agent
            self._attach(a)
        elif it.channel is not None:
            self._refresh(a, (it.channel,))

    def _forget(self, it: _Item) -> None:
        it.token = self._next_seq()
        self._echo.pop(it.id, None)
        del self._items[it.id]

    def _push(self, it: _Item) -> None:
        """The item waits (again) in its bucket, at the place its key gives it."""
        assert it.channel is not None
        it.token = self._next_seq()
        key = it.bucket
        bucket = self._bucket(key)
        heapq.heappush(bucket.heap, (*it.key, it.token))
        if len(bucket.heap) > bucket.compact_at:
            bucket.heap = [entry for entry in bucket.heap if self._live(entry)]
            heapq.heapify(bucket.heap)
            bucket.compact_at = max(_COMPACT_MIN, 2 * len(bucket.heap))
        self._dirty.add(key)

    def _live(self, entry: HeapEntry) -> bool:
        it = self._items.get(entry[2])
        return it is not None and it.token == entry[3] and it.state == WAITING

    def _head(self, bucket: _Bucket) -> ItemKey | None:
        heap = bucket.heap
        while heap:
            top = heap[0]
            if self._live(top):
                return (top[0], top[1], top[2])
            heapq.heappop(heap)
        return None

    def _wake_at(self, at: float, it: _Item) -> None:
        wakeup = (at, it.bucket)
        if wakeup not in self._wakeup_set:
            self._wakeup_set.add(wakeup)
            heapq.heappush(self._wakeups, wakeup)

    def _expiry_valid(self, entry: tuple[float, str, str, int]) -> bool:
        it = self._items.get(entry[1])
        return it is not None and it.state == OFFERED and it.seq == entry[3]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ---- indexes --------------------------------------------------------------------------

    def _agent(self, agent: str) -> _Agent:
        a = self._agents.get(agent)
        if a is None:
            # Presence or an assignment seen before the agent's definition: no skills yet.
            a = self._agents[agent] = _Agent(AgentSpec(agent, frozenset(), frozenset(), {}))
        return a

    def _offered_items(self, a: _Agent) -> list[_Item]:
        """The agent's outstanding offers, oldest first."""
        pairs = sorted((seq, item) for offers in a.offers.values() for item, seq in offers.items())
        return [self._items[item] for _, item in pairs]

    def _bucket(self, key: BucketKey) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            for a in self._agents.values():
                if self._eligible(a, key):
                    self._detach(a)
                    bucket.eligible.add(a.spec.id)
                    a.buckets.setdefault(key[1], set()).add(key)
                    self._attach(a)
        return bucket

    def _eligible(self, a: _Agent, key: BucketKey) -> bool:
        queue, channel, language = key
        spec = self._queues.get(queue)
        if spec is None or (spec.channels and channel not in spec.channels):
            return False
        if not _serves(spec, a.spec) or (language and language not in a.spec.languages):
            return False
        return capacity(a.spec, channel) > 0

    def _reindex(self, agents: Iterable[_Agent], keys: list[BucketKey]) -> None:
        """Recompute which of the buckets the agents are eligible for, drop the offers they
        can no longer hold (newest first), and put them back in the free lists."""
        for a in agents:
            self._detach(a)
            aid = a.spec.id
            for key in keys:
                bucket, channel = self._buckets[key], key[1]
                if self._eligible(a, key):
                    bucket.eligible.add(aid)
                    a.buckets.setdefault(channel, set()).add(key)
                else:
                    bucket.eligible.discard(aid)
                    a.buckets.get(channel, set()).discard(key)
            offered = [(it, it.offer) for it in self._offered_items(a)]
            for it, _ in offered:
                self._cancel(it)
            for it, offer in offered:  # oldest first, so a capacity cut withdraws the newest
                assert offer is not None
                if self._fits(it, a):
                    self._place(it, a, offer, it.seq)
                else:
                    self._push(it)
            self._attach(a)

    def _detach(self, a: _Agent) -> None:
        """Take the agent out of every free list (before a change to its keys)."""
        for channel, key in a.keys.items():
            for bkey in a.buckets.get(channel, ()):
                free = self._buckets[bkey].free
                del free[bisect_left(free, key)]
        a.keys.clear()
        a.attached = False

    def _attach(self, a: _Agent) -> None:
        """Put the agent in the free lists it belongs in; those buckets may have work for it."""
        a.attached = True
        for channel, bkeys in a.buckets.items():
            key = self._key(a, channel)
            if key is None:
                continue
            a.keys[channel] = key
            for bkey in bkeys:
                insort(self._buckets[bkey].free, key)
            self._dirty.update(bkeys)
        if a.presence != AVAILABLE or a.misses >= self._max_misses:
            # Others' items that skipped this agent may now fall back to it.
            for bkeys in a.buckets.values():
                self._dirty.update(bkeys)

    def _refresh(self, a: _Agent, channels: Iterable[str]) -> None:
        """Move the agent in the free lists of the channels after its use of them changed."""
        if not a.attached:
            return
        for channel in channels:
            old = a.keys.get(channel)
            new = self._key(a, channel)
            if old == new:
                continue
            bkeys = a.buckets.get(channel, ())
            for bkey in bkeys:
                free = self._buckets[bkey].free
                if old is not None:
                    del free[bisect_left(free, old)]
                if new is not None:
                    insort(free, new)
            if new is None:
                a.keys.pop(channel, None)
            else:
                a.keys[channel] = new
                if old is None:
                    self._dirty.update(bkeys)  # capacity freed: used at once

    def _index_add(self, it: _Item) -> None:
        insort(self._by_queue.setdefault(it.queue, []), it.key)
        insort(self._since.setdefault(it.queue, []), (it.since, it.id))

    def _index_remove(self, it: _Item) -> None:
        keys, since = self._by_queue[it.queue], self._since[it.queue]
        del keys[bisect_left(keys, it.key)]
        del since[bisect_left(since, (it.since, it.id))]


def _serves(spec: QueueSpec, agent: AgentSpec) -> bool:
    if spec.skill is not None and spec.skill not in agent.skills:
        return False
    return spec.language is None or spec.language in agent.languages


def _same(a: Offer, b: Offer) -> bool:
    return a.item == b.item and a.agent == b.agent and a.expires_at == b.expires_at


def _reason(chosen: AgentKey, runner_up: AgentKey, *, retry: bool) -> str:
    if retry:
        return ONLY_AGENT_LEFT
    if chosen[:2] != runner_up[:2]:
        return LEAST_LOADED
    if chosen[2] != runner_up[2]:
        return LONGEST_IDLE
    return AGENT_ID
