"""Kafka factories: topic creation, producers and consumers (see docs/kafka.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.settings import Settings

# Kafka error codes that ensure_topics accepts in a CreateTopics answer.
_NO_ERROR = 0
_TOPIC_ALREADY_EXISTS = 36


class TopicCreationError(RuntimeError):
    """The cluster refused to create a topic (other than because it already exists)."""


def app_topics(settings: Settings) -> dict[str, int]:
    """The topics the application needs, name → partition count."""
    return {
        settings.contact_events_topic: settings.kafka_partitions,
        settings.dead_letter_topic: 1,
    }


async def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    request_timeout_ms: int = 10_000,
) -> None:
    """Create the topics in `topics` (name → partitions) that do not exist yet.

    Topics that exist, or that another process creates at the same moment, are left as they
    are (their partition count is not changed).
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if not missing:
            return
        response = await admin.create_topics(missing, timeout_ms=request_timeout_ms)
        failures = [
            f"{topic}: error {code} {message or ''}".strip()
            for topic, code, message, *_ in response.topic_errors
            if code not in (_NO_ERROR, _TOPIC_ALREADY_EXISTS)
        ]
        if failures:
            raise TopicCreationError("could not create Kafka topics: " + "; ".join(failures))
    finally:
        await admin.close()


def producer_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer from the settings."""
    if settings.kafka_bootstrap is None:
        raise ValueError("no Kafka bootstrap configured (INBOX_KAFKA_BOOTSTRAP)")
    return _producer_kwargs(settings.kafka_bootstrap, idempotence=settings.kafka_idempotence)


def _producer_kwargs(bootstrap: str, *, idempotence: bool) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        # Every publisher waits for the acknowledgement before it answers (a webhook, an SMTP
        # DATA, an IVR step): a linger would add itself to each answer. Records still batch,
        # as aiokafka keeps one request in flight per broker and gathers what arrives meanwhile
        # (bench.voice: Kafka-acked steps p50 8.1-8.5 -> 2.7-3.6 ms).
        "linger_ms": 0,
        # An email's contact event is ~40 KB: with the default 16 KiB batches each would go
        # alone; half a MiB batches a dozen and stays under the brokers' 1 MiB message limit.
        "max_batch_size": 512 * 1024,
        # InitProducerId is rejected by the embedded broker: a setting, on for Apache Kafka.
        "enable_idempotence": idempotence,
    }


def make_producer(bootstrap: str, *, idempotence: bool, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not started) that waits for all in-sync replicas."""
    return AIOKafkaProducer(**{**_producer_kwargs(bootstrap, idempotence=idempotence), **overrides})


def consumer_config(bootstrap: str, group_id: str | None) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }


def make_consumer(
    bootstrap: str, group_id: str | None, *topics: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer (not started) in `group_id` that commits only when told to.

    With no topics, call `subscribe(...)` (with a rebalance listener) or `assign(...)` later.
    """
    config = consumer_config(bootstrap, group_id)
    config.update(overrides)
    return AIOKafkaConsumer(*topics, **config)
