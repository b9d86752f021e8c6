"""Fixtures for end-to-end tests: the whole stack in this process over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from infra import composition
from infra.broker import free_port
from infra.settings import Settings, load_settings
from tests.conftest import SettingsFactory, TopicFactory

TOKEN = "test-admin-token"


@dataclass
class Stack:
    settings: Settings
    client: httpx.AsyncClient

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(path, params=params)

    async def post(self, path: str, body: Any = None) -> httpx.Response:
        return await self.client.post(path, json=body)


def env_of(settings: Settings) -> dict[str, str]:
    env = {"INBOX_DATA_DIR": str(settings.data_dir), "INBOX_DATABASE_URL": settings.database_url}
    if settings.kafka_bootstrap:
        env["INBOX_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
        env["INBOX_KAFKA_IDEMPOTENCE"] = "0"
    return env


@pytest.fixture
def stack_env() -> dict[str, str]:
    """Extra environment for the stack; a test module overrides it (e.g. to name a relay)."""
    return {}


@pytest.fixture
async def stack(
    settings: SettingsFactory,
    database_url: str,
    fresh_topic: TopicFactory,
    stack_env: dict[str, str],
) -> AsyncIterator[Stack]:
    topic = fresh_topic("contact-events")
    env = {
        "INBOX_HTTP_PORT": str(free_port()),
        "INBOX_SMTP_PORT": str(free_port()),
        "INBOX_ADMIN_TOKEN": TOKEN,
        "INBOX_KAFKA_TOPIC": topic,
        "INBOX_CONSUMER_GROUP": f"group-{topic}",
        "INBOX_KAFKA_PARTITIONS": "2",
        **stack_env,
    }
    # The variables go through load_settings, as the CLI's would.
    config = load_settings({**env_of(settings(database_url)), **env})
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.create_task(
        composition.run(
            config,
            http=True,
            worker=True,
            projections=True,
            smtp=True,
            routing=True,
            say=lines.append,
            stop=stop,
        )
    )
    base = f"http://{config.http_host}:{config.http_port}"
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ) as client:

        async def up() -> bool:
            try:
                return (await client.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        for _ in range(200):
            if task.done() or await up():
                break
            await asyncio.sleep(0.05)
        if task.done():
            task.result()
        assert any("HTTP API" in line for line in lines)
        yield Stack(config, client)
    stop.set()
    await asyncio.wait_for(task, 30)


async def listed(stack: Stack, count: int, **params: Any) -> list[dict[str, Any]]:
    """The inbox list once it holds at least `count` items (polls; no timing asserted)."""

    async def probe() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = (await stack.get("/api/v1/conversations", **params)).json()[
            "items"
        ]
        return items if len(items) >= count else None

    deadline = asyncio.get_running_loop().time() + 30
    while True:
        items = await probe()
        if items is not None:
            return items
        assert asyncio.get_running_loop().time() < deadline, "conversations did not show up"
        await asyncio.sleep(0.05)
