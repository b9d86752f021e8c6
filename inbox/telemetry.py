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


# The `reason` label of DEAD_LETTERED: what part of the record was wrong (the reason's own
# text names values, times and sizes: as a label, each would be a series of its own).
_REASON_LABELS = (
    ("empty record", "empty"),
    ("record of ", "too_large"),
    ("not JSON", "not_json"),
    ("invalid contact event", "malformed"),
    ("unknown schema", "schema"),
    ("event_id", "event_id"),
    ("occurred_at", "occurred_at"),
    ("customer", "customer"),
    ("payload", "payload"),
    ("a message needs", "payload"),
    ("a NUL character", "nul"),
)
DEAD_LETTER_REASONS = (*dict.fromkeys(label for _, label in _REASON_LABELS), "other")
for _label in DEAD_LETTER_REASONS:
    DEAD_LETTERED.labels(_label)  # every series from the start, at 0


def reason_label(reason: str) -> str:
    """One of DEAD_LETTER_REASONS for a dead letter's reason."""
    return next((label for start, label in _REASON_LABELS if reason.startswith(start)), "other")


# Live gauges of the routing process (set after every round of `inbox route` / `inbox dev`).
QUEUE_DEPTH = Gauge("inbox_queue_depth", "Conversations and calls waiting in a queue", ["queue"])
QUEUE_LONGEST_WAIT = Gauge(
    "inbox_queue_longest_wait_seconds", "How long the longest waiting item has waited", ["queue"]
)
AGENTS = Gauge("inbox_agents", "Agents by presence", ["presence"])
CALLBACKS_PENDING = Gauge("inbox_callbacks_pending", "Callbacks requested and not yet done")
