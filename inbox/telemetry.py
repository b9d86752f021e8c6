"""Prometheus metrics (CONTRACT.md names). Counters count in this process; gauges that
describe shared state (store and projection positions, lag) are read when scraped."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONSUMED = Counter(
    "inbox_contact_events_consumed", "Kafka records of contact-events read by ingest workers"
)
STORED = Counter(
    "inbox_contact_events_stored", "Contact events that took effect in the event store"
)
DUPLICATES = Counter(
    "inbox_contact_events_duplicates", "Contact events already taken in (same event_id)"
)
DEAD_LETTERED = Counter(
    "inbox_contact_events_dead_lettered", "Records sent to contact-events.dlq", ["reason"]
)
WRITE_CONFLICTS = Counter(
    "inbox_ingest_write_conflicts", "Batches retried after another writer changed an aggregate"
)
STORE_POSITION = Gauge("inbox_event_store_position", "Highest notification id in the event store")
PROJECTION_POSITION = Gauge(
    "inbox_projection_position", "Notification id each projection has applied", ["projection"]
)
CONSUMER_LAG = Gauge(
    "inbox_consumer_lag", "Records of contact-events not yet taken in", ["partition"]
)
PUBLISH_FAILURES = Counter(
    "inbox_publish_failures", "Contact events an adapter could not get acknowledged by Kafka"
)


def reason_label(reason: str) -> str:
    """A bounded label from a free-text reason: its first few words."""
    return " ".join(reason.split(":")[0].split()[:4])[:40]


# Live gauges of the routing process (set after every round of `inbox route` / `inbox dev`).
QUEUE_DEPTH = Gauge("inbox_queue_depth", "Conversations and calls waiting in a queue", ["queue"])
QUEUE_LONGEST_WAIT = Gauge(
    "inbox_queue_longest_wait_seconds", "How long the longest waiting item has waited", ["queue"]
)
AGENTS = Gauge("inbox_agents", "Agents by presence", ["presence"])
CALLBACKS_PENDING = Gauge("inbox_callbacks_pending", "Callbacks requested and not yet done")
