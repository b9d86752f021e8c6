"""The ingest worker: contact-events from Kafka into the event store, a batch at a time.

The event store, not Kafka, holds the truth about what was taken in: each partition's next
offset is recorded with the batch's domain events, and on every assignment the consumer seeks
to it. Kafka offsets are committed too, only so that lag shows in Kafka's own tools.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from eventsourcing.persistence import PersistenceError, Tracking

from inbox import telemetry
from inbox.contact import ContactEvent, InvalidContactEvent, parse_contact_event
from inbox.domain.time import Clock, system_clock
from inbox.ingest import Ingestor
from infra.kafka import make_consumer, make_producer
from infra.settings import CONTACT_EVENTS_TOPIC, DEAD_LETTER_TOPIC
from infra.store import ContactEventRow, EventStore

log = logging.getLogger(__name__)
_DEAD_LETTER_KEEP = 64 * 1024


def position_name(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


@dataclass
class WorkerConfig:
    bootstrap: str
    group_id: str = "inbox-ingest"
    topic: str = CONTACT_EVENTS_TOPIC
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    idempotence: bool = False
    # Records per poll, over all partitions. 20,000 (larger batches, fewer commits) was no
    # faster in bench.ingest and raised the worker's peak memory from ~350 MB to ~520 MB.
    max_records: int = 5000
    # The interpreter's youngest-generation GC threshold while the worker runs (the default is
    # 700). Each batch allocates ~100,000 objects that mostly die by reference counting;
    # collecting every 700 of them spent ~20 % of the worker's time scanning survivors.
    # Process-wide: in `inbox dev` the API shares it (fewer, somewhat longer young
    # collections). None leaves the threshold alone.
    gc_threshold: int | None = 50_000
    retry_delay: float = 1.0
    consumer_overrides: dict[str, Any] = field(
        # A restarted worker rejoins its group after about 1.8 x the session timeout on the
        # embedded broker (docs/kafka.md); short timeouts keep a restart quick.
        # fetch_max_bytes bounds what the consumer prefetches while a batch is applied: the
        # embedded broker ignores max_partition_fetch_bytes (one fetch brought 14,000 records
        # of one partition) but keeps to fetch_max_bytes (default 50 MiB).
        # fetch_max_wait_ms: the embedded broker answers a waiting fetch only when the wait
        # is over, not when a record arrives, so the default 500 ms put ~200 ms between a
        # produce and its storing (`python -m bench.visible`); Apache Kafka answers at once
        # either way, and an idle worker's fetches every 50 ms cost it nothing to speak of.
        default_factory=lambda: {
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            "fetch_max_bytes": 4 * 1024 * 1024,
            "fetch_max_wait_ms": 50,
        }
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Another worker may now change these customers: forget what we cached.
        self.worker.ingestor.cache.clear()
        for tp in revoked:
            self.worker.positions.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.worker.seek_to_stored(assigned)


class IngestWorker:
    def __init__(
        self,
        config: WorkerConfig,
        store: EventStore,
        *,
        ingestor: Ingestor | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.config = config
        self.store = store
        self.ingestor = ingestor or Ingestor(store)
        self.clock = clock
        self.positions: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        # Batches are applied on one thread of their own (made in `run`): with asyncio's
        # default pool each batch could land on another thread, each with its own malloc arena.
        self._store_thread: ThreadPoolExecutor | None = None

    async def seek_to_stored(self, assigned: Sequence[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        for tp in assigned:
            stored = await asyncio.to_thread(
                self.store.position, position_name(tp.topic, tp.partition)
            )
            if stored is None:
                # Nothing taken in from this partition yet: everything Kafka still holds.
                await consumer.seek_to_beginning(tp)
                self.positions[tp] = 0
            else:
                consumer.seek(tp, stored)
                self.positions[tp] = stored
        log.info(
            "assigned %s", {f"{tp.topic}:{tp.partition}": self.positions[tp] for tp in assigned}
        )
        self.ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        producer = make_producer(config.bootstrap, idempotence=config.idempotence)
        consumer = make_consumer(config.bootstrap, config.group_id, **config.consumer_overrides)
        self._consumer = consumer
        consumer.subscribe([config.topic], listener=_Rebalance(self))
        await producer.start()
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        thresholds = gc.get_threshold()
        if config.gc_threshold is not None and thresholds[0] < config.gc_threshold:
            gc.set_threshold(config.gc_threshold, *thresholds[1:])
        try:
            async with consumer:
                while not stop.is_set():
                    batches = await consumer.getmany(timeout_ms=200, max_records=config.max_records)
                    if batches:
                        await self._take_in(consumer, producer, batches, stop)
                    self._update_lag(consumer)
        finally:
            self._consumer = None
            self._store_thread.shutdown(wait=False)
            gc.set_threshold(*thresholds)
            await producer.stop()

    async def _take_in(
        self,
        consumer: AIOKafkaConsumer,
        producer: Any,
        batches: dict[TopicPartition, list[Any]],
        stop: asyncio.Event,
    ) -> None:
        """Takes in one poll: every partition's records in one transaction, each partition's
        next offset recorded with them."""
        now = self.clock()
        parts: list[tuple[Tracking, list[tuple[ContactEvent, ContactEventRow]]]] = []
        dead: list[tuple[TopicPartition, Any, str]] = []
        starts: dict[TopicPartition, int] = {}
        ends: dict[TopicPartition, int] = {}
        for tp, polled in batches.items():
            start = self.positions.get(tp, 0)
            records = [r for r in polled if r.offset >= start]
            if not records:
                continue
            telemetry.CONSUMED.inc(len(records))
            valid: list[tuple[ContactEvent, ContactEventRow]] = []
            for record in records:
                try:
                    event = parse_contact_event(record.value, now=now)
                except InvalidContactEvent as exc:
                    dead.append((tp, record, str(exc)))
                    continue
                valid.append(
                    (event, ContactEventRow(event.event_id, tp.topic, tp.partition, record.offset))
                )
            starts[tp], ends[tp] = start, records[-1].offset + 1
            parts.append((Tracking(position_name(tp.topic, tp.partition), ends[tp]), valid))
        if not parts:
            return
        while not stop.is_set():
            try:
                if dead:
                    await self._dead_letter(producer, dead)
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._store_thread, self.ingestor.apply_poll, parts
                )
                break
            except (KafkaError, PersistenceError, OSError, TimeoutError) as exc:
                # The poll did not land: nothing of it is recorded, so try it again.
                names = ", ".join(t.application_name for t, _ in parts)
                log.warning("batch of %s failed, retrying: %r", names, exc)
                await asyncio.sleep(self.config.retry_delay)
        else:
            # Stopping: leave the records to whoever gets the partitions next.
            for tp, start in starts.items():
                consumer.seek(tp, start)
            return
        self.positions.update(ends)
        if not outcome.skipped:
            telemetry.STORED.inc(outcome.stored)
            telemetry.DUPLICATES.inc(outcome.duplicates)
            for _, _, reason in dead:
                telemetry.DEAD_LETTERED.labels(telemetry.reason_label(reason)).inc()
        try:
            await consumer.commit(ends)
        except KafkaError as exc:  # only informational: the store holds the positions
            log.info("could not commit offsets %s: %r", ends, exc)

    async def _dead_letter(
        self, producer: Any, dead: Sequence[tuple[TopicPartition, Any, str]]
    ) -> None:
        """Waits for Kafka to acknowledge every dead letter before the batch is recorded. A
        crash in between may send one twice; `source` tells a reader which ones repeat."""
        futures = []
        for tp, record, reason in dead:
            value = record.value or b""
            # The letter must fit where the record did not: keep the start of an oversized one.
            kept = value[:_DEAD_LETTER_KEEP]
            original: dict[str, Any] = {"size": len(value), "truncated": len(kept) < len(value)}
            try:
                original["text"] = kept.decode("utf-8")
            except UnicodeDecodeError:
                original["base64"] = base64.b64encode(kept).decode("ascii")
            letter = orjson.dumps(
                {
                    "reason": reason,
                    "source": {
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "offset": record.offset,
                    },
                    "key": None if record.key is None else record.key.decode("utf-8", "replace"),
                    "value": original,
                }
            )
            futures.append(
                await producer.send(
                    self.config.dead_letter_topic,
                    value=letter,
                    key=record.key,
                    headers=[("reason", reason.encode()[:1000])],
                )
            )
        await asyncio.gather(*futures)

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp, position in self.positions.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                telemetry.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, highwater - position))
