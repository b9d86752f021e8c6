"""A worker killed with SIGKILL in the middle of a batch, then restarted: every contact event
is stored exactly once, in the event store and in the read models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings
from infra.store import EventStore, open_event_store
from projections.db import open_read_models
from projections.replay import PROJECTIONS
from projections.runner import ProjectionRunner
from tests.conftest import SettingsFactory, TopicFactory
from tests.support import contact_event, make_topics, produce

pytestmark = pytest.mark.slow

TOTAL = 10_000
CUSTOMERS = 500


def _env(settings: Settings, database_url: str, topic: str) -> dict[str, str]:
    assert settings.kafka_bootstrap is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("INBOX_")}
    env.update(
        INBOX_DATA_DIR=str(settings.data_dir),
        INBOX_DATABASE_URL=database_url,
        INBOX_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        INBOX_KAFKA_IDEMPOTENCE="0",
        INBOX_KAFKA_TOPIC=topic,
        INBOX_CONSUMER_GROUP=f"group-{topic}",
    )
    return env


@pytest.fixture
def start_worker() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "inbox.cli", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stored(store: EventStore) -> int:
    return store.ingest.count_contact_events()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    assert callable(predicate)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def test_sigkill_mid_batch_then_restart_stores_everything_once(
    kafka_bootstrap: str,
    fresh_topic: TopicFactory,
    settings: SettingsFactory,
    database_url: str,
    tmp_path: Path,
    start_worker: list[subprocess.Popen[bytes]],
) -> None:
    config = settings(database_url)
    topic = fresh_topic("contact-events")
    await make_topics(kafka_bootstrap, topic, partitions=4)
    events = [
        contact_event(
            f"ev-{n}",
            channel=("sms", "whatsapp")[n % 2],
            customer={"phone": f"+1415555{n % CUSTOMERS:04d}"},
            payload={"text": f"message {n}"},
            seconds=n,
        )
        for n in range(TOTAL)
    ]
    await produce(kafka_bootstrap, topic, events)

    store = open_event_store(config)
    env = _env(config, database_url, topic)
    log = tmp_path / "worker.log"
    first = _spawn(env, log)
    start_worker.append(first)
    # Kill it while it is taking in batches: some stored, not all.
    _wait(lambda: _stored(store) > 0 or first.poll() is not None, 60, "the first batch")
    assert first.poll() is None, log.read_text()
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = _stored(store)
    assert 0 < killed_at < TOTAL, f"killed after {killed_at} events: not mid-stream"

    second = _spawn(env, log)
    start_worker.append(second)
    _wait(lambda: _stored(store) >= TOTAL or second.poll() is not None, 120, "all events")
    assert second.poll() is None, log.read_text()
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, log.read_text()

    # In the event store: every contact event once, every message once.
    assert _stored(store) == TOTAL
    received = [
        n
        for n in store.notifications(0, 10 * TOTAL)
        if n.topic.endswith("Conversation.MessageReceived")
    ]
    assert len(received) == TOTAL
    assert len({n.state for n in received}) == TOTAL

    # In the read models, fed from the store.
    read_models = open_read_models(config)
    runner = ProjectionRunner(store, read_models, [f() for f in PROJECTIONS.values()])
    while runner.run_once(5000):
        pass
    with read_models.read() as tx:
        inbox_rows = tx.execute("SELECT COUNT(*) FROM inbox_conversations_g1").fetchone()
        messages = tx.execute(
            "SELECT COUNT(*) FROM timeline_entries_g1 WHERE kind='message'"
        ).fetchone()
    assert inbox_rows is not None
    assert messages is not None
    assert inbox_rows[0] == CUSTOMERS
    assert messages[0] == TOTAL
    read_models.close()
    store.close()
