"""Routing benchmark: the time of one routing decision (`Router.decide`) after a single event,
with 500 agents and 10,000 waiting items over 20 queues, beside the raw limit of the data
structures it is built on, measured in the same run.

    python -m bench.routing [--agents 500] [--waiting 10000] [--queues 20] [--events 3000]

Setup: every agent available, enough items enqueued to fill every agent's capacity (offers
made and accepted) and leave `--waiting` items waiting. Then, `--events` times each, one event
followed by the timed `decide()`: an agent releases an item (its capacity is offered at once),
an item arrives, an agent goes away or comes back; 10 % of offers are left unanswered, so
offers lapse as time goes on, and the decide after those lapses is timed too.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import statistics
import time
from bisect import bisect_left, insort
from collections import defaultdict

from inbox.domain.routing import AgentSpec, Offer, QueueSpec, Router

T0 = 1_800_000_000.0
SKILLS = [f"skill-{n}" for n in range(10)]
CHANNELS = ("voice", "chat", "email", "whatsapp")
TARGET_P99_MS = 5.0


def build_queues(count: int) -> list[QueueSpec]:
    channel_sets: tuple[frozenset[str], ...] = (
        frozenset(),
        frozenset({"voice"}),
        frozenset({"chat", "whatsapp"}),
    )
    languages = (None, None, "es", None, "fr")
    return [
        QueueSpec(
            f"queue-{n:02d}",
            skill=SKILLS[n % len(SKILLS)],
            channels=channel_sets[n % len(channel_sets)],
            language=languages[n % len(languages)],
        )
        for n in range(count)
    ]


def build_agents(count: int, rng: random.Random) -> list[AgentSpec]:
    agents = []
    for n in range(count):
        languages = {"en"} | {lang for lang in ("es", "fr") if rng.random() < 0.3}
        agents.append(
            AgentSpec(
                f"agent-{n:03d}",
                frozenset(rng.sample(SKILLS, rng.randint(2, 5))),
                frozenset(languages),
                {
                    "voice": rng.choice((0, 1, 1)),
                    "chat": rng.randint(1, 4),
                    "email": rng.randint(0, 6),
                    "messaging": rng.randint(1, 3),
                },
            )
        )
    return agents


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(7)
        self.router = Router()
        self.queues = build_queues(args.queues)
        self.now = T0
        self.serial = 0
        self.held: list[str] = []  # assigned items, in no particular order
        self.away: list[str] = []
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)  # the same decides, CPU time
        self.offers: dict[str, int] = defaultdict(int)
        for q in self.queues:
            self.router.set_queue(q)
        self.agents = build_agents(args.agents, self.rng)
        for a in self.agents:
            self.router.set_agent(a)
            self.router.set_presence(a.id, "available", T0)

    def arrive(self) -> None:
        queue = self.rng.choice(self.queues)
        channels = sorted(queue.channels) or CHANNELS
        self.serial += 1
        self.router.enqueue(
            f"item-{self.serial:06d}",
            queue=queue.name,
            channel=self.rng.choice(channels),
            priority=self.rng.choice((0, 0, 0, 1, 2)),
            since=self.now,
            customer=f"customer-{self.rng.randrange(50_000)}",
        )

    def answer(self, offers: list[Offer], rate: float = 0.9) -> None:
        """Agents accept most offers; the others lapse later."""
        for offer in offers:
            if self.rng.random() < rate:
                self.router.assigned(offer.item, offer.agent, self.now)
                self.held.append(offer.item)

    def fill(self, waiting: int) -> None:
        while True:
            for _ in range(2000):
                self.arrive()
            self.answer(self.router.decide(self.now), rate=1.0)
            total = sum(self.router.depth(q.name) for q in self.queues)
            if total >= waiting:
                return

    def timed(self, kind: str) -> None:
        cpu, start = time.thread_time(), time.perf_counter()
        offers = self.router.decide(self.now)
        self.timings[kind].append(time.perf_counter() - start)
        self.cpu[kind].append(time.thread_time() - cpu)
        self.offers[kind] += len(offers)
        self.answer(offers)

    def run(self, events: int) -> None:
        for n in range(events * 3):
            self.now += 0.05
            if self.router.expire(self.now):
                self.timed("after offers lapsed")
            kind = n % 3
            if kind == 0 and self.held:
                index = self.rng.randrange(len(self.held))
                self.held[index], self.held[-1] = self.held[-1], self.held[index]
                self.router.released(self.held.pop(), self.now)
                self.timed("after a release")
            elif kind == 1:
                self.arrive()
                self.timed("after an arrival")
            elif kind == 2:
                if self.away and (len(self.away) > 25 or self.rng.random() < 0.5):
                    agent = self.away.pop(self.rng.randrange(len(self.away)))
                    self.router.set_presence(agent, "available", self.now)
                else:
                    agent = self.rng.choice(self.agents).id
                    self.router.set_presence(agent, "away", self.now)
                    self.away.append(agent)
                self.timed("after a presence change")


def raw_limits(size: int, agents: int, rounds: int = 20_000) -> tuple[float, float]:
    """Per-operation cost of the structures decide is made of: one heappush + heappop on a
    heap of `size` item entries, and one delete + insort in a sorted list of `agents` keys."""
    rng = random.Random(3)
    heap = [(-rng.randrange(3), rng.random(), f"item-{n:06d}", n) for n in range(size)]
    heapq.heapify(heap)
    entries = [(-rng.randrange(3), rng.random(), f"x-{n:06d}", n) for n in range(rounds)]
    start = time.perf_counter()
    for entry in entries:
        heapq.heappush(heap, entry)
        heapq.heappop(heap)
    heap_cost = (time.perf_counter() - start) / rounds
    keys = sorted((rng.random(), rng.randrange(4), rng.random(), f"a{n}") for n in range(agents))
    start = time.perf_counter()
    for n in range(rounds):
        key = keys[n % agents]
        del keys[bisect_left(keys, key)]
        insort(keys, key)
    return heap_cost, (time.perf_counter() - start) / rounds


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def line(label: str, samples: list[float], cpu: list[float], offers: int) -> str:
    p50 = statistics.median(samples) * 1e3
    return (
        f"  decide {label:<24} n={len(samples):>5}  p50 {p50:5.3f}  p99 {p99(samples) * 1e3:5.3f}"
        f"  max {max(samples) * 1e3:6.3f} ms  (CPU p99 {p99(cpu) * 1e3:5.3f}"
        f" max {max(cpu) * 1e3:5.3f} ms; {offers / len(samples):.2f} offers each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--queues", type=int, default=20)
    parser.add_argument("--events", type=int, default=3000)
    args = parser.parse_args()
    started = time.perf_counter()
    bench = Bench(args)
    bench.fill(args.waiting)
    setup = time.perf_counter() - started
    waiting = sum(bench.router.depth(q.name) for q in bench.queues)
    bench.run(args.events)
    heap_cost, insort_cost = raw_limits(waiting, args.agents)
    print(
        f"routing benchmark: {args.agents} agents, {args.queues} queues, {waiting:,} waiting "
        f"items, {len(bench.held):,} assigned (setup {setup:.1f} s)"
    )
    print(f"  raw limit: heappush + heappop, {waiting:,}-item heap      {heap_cost * 1e6:6.2f} µs")
    print(
        f"  raw limit: delete + insort, {args.agents}-agent sorted list    "
        f"{insort_cost * 1e6:6.2f} µs"
    )
    everything: list[float] = []
    everything_cpu: list[float] = []
    for kind, samples in bench.timings.items():
        print(line(kind, samples, bench.cpu[kind], bench.offers[kind]))
        everything += samples
        everything_cpu += bench.cpu[kind]
    print(line("(all)", everything, everything_cpu, sum(bench.offers.values())))
    verdict = "met" if p99(everything) * 1e3 < TARGET_P99_MS else "NOT met"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"  target p99 < {TARGET_P99_MS:.0f} ms (wall): {verdict}; load average {load}")
    print("  (wall max above CPU max: the process was preempted, or the garbage collector ran)")


if __name__ == "__main__":
    main()
