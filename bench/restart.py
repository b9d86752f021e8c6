"""How long a restarted routing process (`inbox route`) reads before it decides again, beside
the raw limit of reading and decoding the same events in the same run: without a saved state
it rebuilds its state from the whole log (`Distributor.catch_up`); with one (saved when the
process stops, and every `SAVE_EVERY` events) it takes that up and reads only the log after it.

    python -m bench.restart [--events 1000000] [--customers 20000] [--database-url URL]

The history is bench.replay's (customers, conversations with messages, notes, assignments,
resolutions and reopens), written through the domain aggregates.
"""

from __future__ import annotations

import argparse
import resource
import time

from bench import fresh_settings
from bench.replay import write_history
from inbox.agents import Directory
from inbox.distribution import HANDLES, Distributor
from infra.store import open_event_store
from projections.db import open_read_models
from projections.process_state import ReadModelProcessStates
from projections.runner import decode, gc_paused, read_log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    settings = fresh_settings("restart", args.database_url)
    store = open_event_store(settings)
    states = ReadModelProcessStates(open_read_models(settings))
    written = write_history(store, args.events, args.customers)

    started = time.perf_counter()
    position = 0
    while records := read_log(store, position, 2000):
        with gc_paused():
            decode(records, HANDLES)
        position = records[-1][0]
    raw = time.perf_counter() - started

    distributor = Distributor(store, Directory(store, admin_token="bench"), states=states)
    started = time.perf_counter()
    read = distributor.catch_up()
    seconds = time.perf_counter() - started
    assert read == written
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    read_into = len(distributor.convs)
    started = time.perf_counter()
    assert distributor.save_state()
    save = time.perf_counter() - started
    set_aside = read_into - len(distributor.convs)
    saved = states.latest(distributor.state_name)
    assert saved is not None
    restarted = Distributor(store, Directory(store, admin_token="bench"), states=states)
    started = time.perf_counter()
    assert restarted.restore()
    assert restarted.catch_up() == 0
    restore = time.perf_counter() - started
    print(
        f"restart of the routing process over {written:,} stored events, "
        f"{args.database_url or 'SQLite'}"
    )
    print(
        f"  catch up before deciding   {seconds:6.1f} s  {read / seconds:>10,.0f} events/s "
        f"({read_into:,} conversations in memory, peak resident {rss:,.0f} MB)"
    )
    print(
        f"  with the state saved at the end: takes it up in {restore:.2f} s "
        f"({len(saved[1]) / 1e6:,.1f} MB; saving it took {save:.2f} s)"
    )
    print(
        f"  the save set {set_aside:,} resolved conversations aside: "
        f"{len(restarted.convs):,} kept in memory"
    )
    print(f"  raw limit: read + decode   {raw:6.1f} s  {written / raw:>10,.0f} events/s")
    store.close()


if __name__ == "__main__":
    main()
