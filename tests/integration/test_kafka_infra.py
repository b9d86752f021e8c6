"""The Kafka factories and the shared fixtures, against the real embedded broker and PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra.broker import EmbeddedBroker, wait_ready
from infra.kafka import ensure_topics, make_consumer, make_producer, producer_config
from infra.settings import Settings
from tests.conftest import PostgresServer, SettingsFactory, TopicFactory

# Tansu waits session_timeout_ms / 2 for members to join; keep group tests quick.
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 200}


async def _partitions(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()


async def _consume(consumer: AIOKafkaConsumer, count: int, within: float = 20.0) -> list[bytes]:
    values: list[bytes] = []

    async def loop() -> None:
        while len(values) < count:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                values.extend(r.value for r in records if r.value is not None)

    await asyncio.wait_for(loop(), within)
    return values


async def test_wait_ready_against_the_broker(kafka_bootstrap: str) -> None:
    await wait_ready(kafka_bootstrap, timeout=5)


async def test_wait_ready_times_out_on_a_closed_port() -> None:
    from infra.broker import free_port

    with pytest.raises(TimeoutError, match="not ready"):
        await wait_ready(f"127.0.0.1:{free_port()}", timeout=0.5)


def test_broker_start_stop_is_idempotent() -> None:
    broker = EmbeddedBroker()
    with broker:
        assert broker.running
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert not broker.running
    broker.stop()


async def test_topics_created_twice_without_error(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    events, dlq = fresh_topic("events"), fresh_topic("events.dlq")
    await ensure_topics(kafka_bootstrap, {events: 4, dlq: 1})
    await ensure_topics(kafka_bootstrap, {events: 4, dlq: 1})
    # Two processes racing to create the same topic.
    racing = fresh_topic("race")
    await asyncio.gather(*(ensure_topics(kafka_bootstrap, {racing: 3}) for _ in range(3)))
    assert await _partitions(kafka_bootstrap, events) == 4
    assert await _partitions(kafka_bootstrap, dlq) == 1
    assert await _partitions(kafka_bootstrap, racing) == 3


async def test_a_second_consumer_resumes_from_the_committed_offset(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    topic, group = fresh_topic("orders"), fresh_topic("group")
    await ensure_topics(kafka_bootstrap, {topic: 2})
    producer = make_producer(kafka_bootstrap, idempotence=False)
    async with producer:
        for i in range(10):
            await producer.send(topic, key=b"k%d" % (i % 3), value=b"first-%d" % i)
        await producer.flush()

    first = make_consumer(kafka_bootstrap, group, topic, **FAST_GROUP)
    async with first:
        got = await _consume(first, 10)
        await first.commit()
    assert sorted(got) == sorted(b"first-%d" % i for i in range(10))

    async with make_producer(kafka_bootstrap, idempotence=False) as producer:
        for i in range(5):
            await producer.send(topic, key=b"k%d" % (i % 3), value=b"second-%d" % i)
        await producer.flush()

    second = make_consumer(kafka_bootstrap, group, topic, **FAST_GROUP)
    async with second:
        got = await _consume(second, 5)
        extra = await second.getmany(timeout_ms=300)
        assert not any(extra.values())
        committed = {p: await second.committed(TopicPartition(topic, p)) for p in (0, 1)}
    assert sorted(got) == sorted(b"second-%d" % i for i in range(5))
    assert sum(offset or 0 for offset in committed.values()) == 10


async def test_seek_rereads_from_an_offset(kafka_bootstrap: str, fresh_topic: TopicFactory) -> None:
    topic = fresh_topic("seek")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    async with make_producer(kafka_bootstrap, idempotence=False) as producer:
        for i in range(6):
            await producer.send_and_wait(topic, value=b"%d" % i)
    tp = TopicPartition(topic, 0)
    consumer = make_consumer(kafka_bootstrap, None)
    async with consumer:
        consumer.assign([tp])
        consumer.seek(tp, 4)
        assert await _consume(consumer, 2) == [b"4", b"5"]


def test_producer_config_follows_the_settings(settings: SettingsFactory) -> None:
    config = producer_config(settings(bootstrap="kafka:9092", INBOX_KAFKA_IDEMPOTENCE="1"))
    assert config == {
        "bootstrap_servers": "kafka:9092",
        "acks": "all",
        "linger_ms": 0,
        "max_batch_size": 512 * 1024,
        "enable_idempotence": True,
    }
    assert producer_config(settings())["enable_idempotence"] is False


def test_settings_factory(
    settings: SettingsFactory, database_url: str, kafka_bootstrap: str
) -> None:
    built: Settings = settings(database_url)
    assert built.database_url == database_url
    assert built.kafka_bootstrap == kafka_bootstrap
    assert built.data_dir.is_dir()
    assert settings(bootstrap=None).kafka_bootstrap is None


@pytest.mark.postgres
def test_postgres_url_is_a_fresh_empty_database(
    postgres_url: str, postgresql_proc: PostgresServer
) -> None:
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgresql_proc.port}/")
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE probe (id bigint PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO probe VALUES (1, 'hello')")
        assert conn.execute("SELECT body FROM probe").fetchall() == [("hello",)]


@pytest.mark.postgres
def test_each_test_gets_its_own_database(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT to_regclass('public.probe')").fetchone()
    assert row == (None,)
