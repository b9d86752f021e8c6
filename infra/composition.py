"""The composition root: builds every part from the settings and runs them. Called by the CLI
only, never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import uvicorn
from starlette.applications import Starlette

from inbox.api import ApiContext, create_app
from inbox.worker import IngestWorker, WorkerConfig
from infra.broker import EmbeddedBroker
from infra.kafka import app_topics, ensure_topics
from infra.settings import Settings
from infra.store import EventStore, open_event_store
from projections.db import ReadModelDB, open_read_models
from projections.replay import PROJECTIONS
from projections.runner import ProjectionRunner
from projections.tracking import ensure_state_table

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root stops every part."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Parts:
    settings: Settings
    store: EventStore
    read_models: ReadModelDB

    def close(self) -> None:
        self.read_models.close()
        self.store.close()


def build_parts(settings: Settings) -> Parts:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    read_models = open_read_models(settings)
    # Queries answer "nothing yet" rather than fail before the projections' first round.
    ensure_state_table(read_models)
    return Parts(settings, open_event_store(settings), read_models)


def build_http_app(parts: Parts) -> Starlette:
    return create_app(ApiContext(parts.store, parts.read_models, parts.settings.admin_token))


def build_worker(parts: Parts) -> IngestWorker:
    settings = parts.settings
    assert settings.kafka_bootstrap is not None
    config = WorkerConfig(
        bootstrap=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        topic=settings.contact_events_topic,
        dead_letter_topic=settings.dead_letter_topic,
        idempotence=settings.kafka_idempotence,
    )
    return IngestWorker(config, parts.store)


def build_projection_runner(parts: Parts) -> ProjectionRunner:
    return ProjectionRunner(
        parts.store, parts.read_models, [factory() for factory in PROJECTIONS.values()]
    )


@contextlib.asynccontextmanager
async def projections_in_thread(runner: ProjectionRunner) -> AsyncIterator[None]:
    stop = threading.Event()
    thread = threading.Thread(
        target=runner.run_forever, args=(stop,), name="projections", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _serve_http(app: Starlette, settings: Settings, stop: asyncio.Event) -> None:
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="warning", lifespan="on"
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    stopped.cancel()
    if not stop.is_set():
        raise RuntimeError(f"HTTP server on {settings.http_host}:{settings.http_port} stopped")


async def _start_kafka(settings: Settings, stack: contextlib.ExitStack) -> Settings:
    if settings.kafka_bootstrap is None:
        broker = EmbeddedBroker(log_path=settings.data_dir / "broker.log")
        await asyncio.to_thread(broker.start)
        stack.callback(broker.stop)
        settings = replace(settings, kafka_bootstrap=broker.bootstrap, kafka_idempotence=False)
    assert settings.kafka_bootstrap is not None
    await ensure_topics(settings.kafka_bootstrap, app_topics(settings))
    return settings


def _banner(settings: Settings, parts_started: list[str], say: Callable[[str], None]) -> None:
    url = f"http://{settings.http_host}:{settings.http_port}"
    say(f"inbox: {', '.join(parts_started)}")
    say(f"  HTTP API          {url}/api/v1/conversations")
    say(f"  health, metrics   {url}/healthz  {url}/metrics")
    say(f"  Kafka             {settings.kafka_bootstrap}  (topic {settings.contact_events_topic})")
    say(f"  event store       {settings.database_url}")
    if settings.admin_token_generated:
        say(f"  admin token       {settings.admin_token}")
    say("Ctrl-C stops.")


async def run(
    settings: Settings,
    *,
    http: bool,
    worker: bool,
    projections: bool,
    say: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Runs the chosen parts until SIGINT/SIGTERM (or `stop`)."""
    stop = stop or asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        _stop_on_signals(stop)
    with contextlib.ExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if worker or http:
            settings = await _start_kafka(settings, stack)
        parts = build_parts(settings)
        stack.callback(parts.close)
        async with contextlib.AsyncExitStack() as running:
            tasks: list[asyncio.Task[Any]] = []
            started: list[str] = []
            if projections:
                await running.enter_async_context(
                    projections_in_thread(build_projection_runner(parts))
                )
                started.append("projections")
            if worker:
                tasks.append(asyncio.create_task(build_worker(parts).run(stop), name="worker"))
                started.append("ingest worker")
            if http:
                tasks.append(
                    asyncio.create_task(
                        _serve_http(build_http_app(parts), settings, stop), name="http"
                    )
                )
                started.append("HTTP")
            await asyncio.sleep(0)
            _banner(settings, started, say)
            await asyncio.wait(
                [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
