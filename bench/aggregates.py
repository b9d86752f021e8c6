"""Loading a long aggregate: an agent with 2,050 events (presence changes), read as
`set_presence` and token checks read it (`EventStore.get`: its latest snapshot and the events
after it), beside a full replay of its events and the raw limit (selecting the same rows,
nothing decoded).

    python -m bench.aggregates [--events 2050] [--loads 200] [--database-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import fresh_settings
from inbox.agents import Directory, agent_profile
from inbox.domain import ids
from infra.store import open_event_store


def _timed(loads: int, load: Callable[[], Any]) -> tuple[float, float]:
    """p50 and p99 of `loads` calls, in ms."""
    times = []
    for _ in range(loads):
        started = time.perf_counter()
        load()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2050)
    parser.add_argument("--loads", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    store = open_event_store(fresh_settings("aggregates", args.database_url))
    directory = Directory(store, admin_token="bench")
    directory.register("ann", agent_profile({"name": "Ann", "role": "agent"}), actor="bench")
    for n in range(args.events - 1):
        status = "available" if n % 2 == 0 else "away"
        directory.set_presence("ann", status, reason="set by agent", actor="bench")
    agent_id = ids.agent_id("ann")

    def replay() -> Any:
        aggregate = None
        for event in store.events_of(agent_id):
            aggregate = event.mutate(aggregate)
        return aggregate

    def raw() -> None:
        snapshot = store.snapshots.recorder.select_events(agent_id, desc=True, limit=1)
        after = snapshot[0].originator_version if snapshot else None
        store.recorder.select_events(agent_id, gt=after)

    assert vars(store.get(agent_id)) == vars(replay())
    loaded = _timed(args.loads, lambda: store.get(agent_id))
    limit = _timed(args.loads, raw)
    full = _timed(max(10, args.loads // 10), replay)
    print(
        f"loading an agent with {args.events:,} events, {args.database_url or 'SQLite'}, "
        f"{args.loads} loads"
    )
    print(f"  snapshot + events after it   p50 {loaded[0]:7.2f} ms   p99 {loaded[1]:7.2f} ms")
    print(f"  raw limit: the same reads    p50 {limit[0]:7.2f} ms   p99 {limit[1]:7.2f} ms")
    print(f"  full replay (no snapshot)    p50 {full[0]:7.2f} ms   p99 {full[1]:7.2f} ms")
    store.close()


if __name__ == "__main__":
    main()
