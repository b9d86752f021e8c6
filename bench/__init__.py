"""Benchmarks: each prints its figures beside the raw limit measured in the same run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from infra.broker import EmbeddedBroker, free_port
from infra.settings import Settings, load_settings


def fresh_settings(name: str, database_url: str | None) -> Settings:
    """Settings with a new data directory of the benchmark's own, and the database at
    `database_url` when given (SQLite in that directory otherwise)."""
    env = {"INBOX_DATA_DIR": tempfile.mkdtemp(prefix=f"bench-{name}-")}
    if database_url:
        env["INBOX_DATABASE_URL"] = database_url
    return load_settings(env)


def kafka(workdir: Path) -> tuple[str, EmbeddedBroker | None]:
    """INBOX_KAFKA_BOOTSTRAP when set, else an embedded broker of the benchmark's own (its log
    in `workdir`; stop it when done)."""
    bootstrap = os.environ.get("INBOX_KAFKA_BOOTSTRAP")
    if bootstrap:
        return bootstrap, None
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    return broker.bootstrap, broker


def app_env(workdir: Path, bootstrap: str, topic: str, **extra: str) -> dict[str, str]:
    """The environment of the `inbox` processes a benchmark starts: this one's without its
    INBOX_* variables, then a data directory in `workdir`, Kafka (idempotence off, as the
    embedded broker needs), the topic with a consumer group of its own, a free HTTP port, the
    admin token "bench", and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INBOX_")}
    env.update(
        INBOX_DATA_DIR=str(workdir / "var"),
        INBOX_KAFKA_BOOTSTRAP=bootstrap,
        INBOX_KAFKA_IDEMPOTENCE="0",
        INBOX_KAFKA_TOPIC=topic,
        INBOX_CONSUMER_GROUP=f"bench-{topic}",
        INBOX_HTTP_PORT=str(free_port()),
        INBOX_ADMIN_TOKEN="bench",
        **extra,
    )
    return env
