"""A conversation's page (GET /api/v1/conversations/{id}) joins its inbox item with its
timeline. The timeline's runner follows the inbox view's, so the page waits for it to apply
what the inbox view had; a timeline that never comes holds the page up only briefly. Served by
uvicorn on a real socket, over the real store and read models (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from eventsourcing.persistence import Tracking

from inbox.contact import ContactEvent, CustomerRef, validate
from inbox.ingest import Ingestor
from infra import composition
from infra.broker import free_port
from infra.store import ContactEventRow
from projections.inbox_view import InboxView, item_position, list_conversations
from projections.runner import ProjectionRunner
from projections.timeline import Timeline
from projections.tracking import active_positions
from tests.conftest import SettingsFactory
from tests.support import serving

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
TOKEN = "page-admin-token"


class Page:
    def __init__(self, parts: composition.Parts, client: httpx.AsyncClient) -> None:
        self.parts = parts
        self.client = client
        self.ingestor = Ingestor(parts.store)
        self.offset = 0

    def message(self, event_id: str, minute: float, email: str = "ann@example.org") -> None:
        raw = ContactEvent(
            event_id=event_id,
            occurred_at=T0 + timedelta(minutes=minute),
            channel="email",
            type="message.received",
            customer=CustomerRef(email=email),
            payload={"text": f"text of {event_id}"},
        )
        event = validate(raw, now=T0 + timedelta(days=1))
        row = ContactEventRow(event_id, "contact-events", 0, self.offset)
        self.offset += 1
        self.ingestor.apply_batch([(event, row)], Tracking("contact-events:0", self.offset))

    def project(self, *projections: InboxView | Timeline) -> None:
        ProjectionRunner(
            self.parts.store, self.parts.read_models, list(projections)
        ).run_until_caught_up()

    async def texts(self) -> list[str]:
        listed = (await self.client.get("/api/v1/conversations")).json()["items"]
        item = next(i for i in listed if i["customer"]["identities"] == ["email:ann@example.org"])
        page: dict[str, Any] = (await self.client.get(f"/api/v1/conversations/{item['id']}")).json()
        assert page["last_message"]["text"] == "text of m2"
        return [e["text"] for e in page["timeline"] if e["kind"] == "message"]


@pytest.fixture
async def page(database_url: str, settings: SettingsFactory) -> AsyncIterator[Page]:
    config = settings(database_url, bootstrap=None, INBOX_ADMIN_TOKEN=TOKEN)
    parts = composition.build_parts(config)
    app = composition.build_http_app(parts)
    try:
        async with (
            serving(app, free_port()) as base,
            httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
            ) as client,
        ):
            p = Page(parts, client)
            p.message("m1", 0)
            p.message("b1", 0.5, email="bob@example.org")
            p.project(InboxView(), Timeline())
            p.message("m2", 1)
            p.project(InboxView())  # the lead has m2, its follower not yet
            yield p
    finally:
        parts.close()


async def test_the_page_waits_for_the_timeline_to_reach_the_inbox_item(page: Page) -> None:
    def timeline_later() -> None:
        threading.Event().wait(0.3)  # well after the page was asked for
        page.project(Timeline())

    follower = threading.Thread(target=timeline_later)
    follower.start()
    try:
        assert await page.texts() == ["text of m1", "text of m2"]
    finally:
        await asyncio.to_thread(follower.join, 30)


async def test_a_timeline_that_never_catches_up_holds_the_page_only_briefly(page: Page) -> None:
    # No runner: after its wait the page shows what there is rather than fail.
    assert await page.texts() == ["text of m1"]


def test_only_an_item_changed_after_the_timeline_s_position_waits(page: Page) -> None:
    # Bob's conversation has not changed since the timeline's position, Ann's has (m2): only
    # Ann's page waits while the timeline trails the inbox view.
    with page.parts.read_models.read() as tx:
        timeline_at = active_positions(tx)["timeline"]
        items = {
            item["customer"]["identities"][0]: item_position(tx, item["id"])
            for item in list_conversations(page.parts.read_models)["items"]
        }
        assert item_position(tx, "no-such-conversation") == 0
    assert items["email:bob@example.org"] <= timeline_at < items["email:ann@example.org"]
