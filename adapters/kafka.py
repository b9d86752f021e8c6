"""The publisher every channel adapter uses: one contact event to `contact-events`, keyed by
the customer's identity key, acknowledged by all in-sync replicas before the adapter answers
its sender."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from inbox.contact import ContactEvent, encode_contact_event
from inbox.telemetry import PUBLISH_FAILURES
from infra.kafka import make_producer
from infra.settings import CONTACT_EVENTS_TOPIC

log = logging.getLogger(__name__)


class PublishFailed(RuntimeError):
    """Kafka did not acknowledge: the adapter answers "try again" (SMTP 451, HTTP 503)."""


class KafkaPublisher:
    """Starts its producer on first use and again after a failure, so an adapter that came up
    while Kafka was down starts working when Kafka is back."""

    def __init__(
        self,
        bootstrap: str,
        *,
        idempotence: bool,
        topic: str = CONTACT_EVENTS_TOPIC,
        timeout: float = 10.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._idempotence = idempotence
        self._topic = topic
        self._timeout = timeout
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()

    async def _started(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is not None:
            return producer
        async with self._lock:
            if self._producer is None:
                producer = make_producer(
                    self._bootstrap,
                    idempotence=self._idempotence,
                    request_timeout_ms=int(self._timeout * 1000),
                )
                try:
                    async with asyncio.timeout(self._timeout):
                        await producer.start()
                except BaseException:
                    self._stop_later(producer)
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, event: ContactEvent) -> None:
        await self.publish_raw(event.key, encode_contact_event(event))

    async def publish_raw(self, key: str, value: bytes) -> None:
        try:
            producer = await self._started()
            async with asyncio.timeout(self._timeout):
                await producer.send_and_wait(self._topic, value=value, key=key.encode())
        except (KafkaError, TimeoutError, OSError) as exc:
            PUBLISH_FAILURES.inc()
            log.warning("Kafka did not acknowledge a contact event: %r", exc)
            self._reset()
            raise PublishFailed(str(exc) or type(exc).__name__) from exc

    def _stop_later(self, producer: AIOKafkaProducer) -> None:
        # stop() waits for pending batches up to the request timeout: the sender gets its
        # "try again" now, and the old producer winds down on its own.
        task = asyncio.get_running_loop().create_task(producer.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            self._stop_later(producer)

    async def close(self) -> None:
        self._reset()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
