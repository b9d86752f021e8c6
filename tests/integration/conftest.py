"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from infra.store import EventStore, open_event_store
from ivr.twilio_rest import TwilioRestCalls
from projections.db import ReadModelDB, open_read_models
from tests.conftest import SettingsFactory
from tests.integration.test_metrics_day import Day
from tests.twilio_rest_stub import ACCOUNT, TOKEN, FakeClock, TwilioRestStub, running_stub


@pytest.fixture
def store(database_url: str, settings: SettingsFactory) -> Iterator[EventStore]:
    """An empty event store on each database."""
    opened = open_event_store(settings(database_url, bootstrap=None))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def other_store(
    database_url: str, settings: SettingsFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[EventStore]:
    """A second empty event store of the same kind (another site's, one started again)."""
    if database_url.startswith("sqlite"):
        (tmp_path / "other").mkdir()
        url = f"sqlite:///{tmp_path / 'other' / 'inbox.db'}"
        opened = open_event_store(settings(url, bootstrap=None))
        try:
            yield opened
        finally:
            opened.close()
        return
    server = request.getfixturevalue("postgresql_proc")
    name = server.create_database()
    opened = open_event_store(settings(server.url(name), bootstrap=None))
    try:
        yield opened
    finally:
        opened.close()
        server.drop_database(name)


@pytest.fixture
def db(database_url: str, settings: SettingsFactory) -> Iterator[ReadModelDB]:
    """Empty read models on each database (beside `store`)."""
    opened = open_read_models(settings(database_url, bootstrap=None))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def day(store: EventStore, db: ReadModelDB) -> Day:
    """An empty store and read models on each database (test_metrics_day.py's own `day`
    holds its scripted day)."""
    return Day(store, db)


@pytest.fixture
async def stub(clock: FakeClock) -> AsyncIterator[TwilioRestStub]:
    """The stand-in for Twilio's Calls API, on the test module's `clock`."""
    async with running_stub(ACCOUNT, TOKEN, clock=clock) as stub:
        yield stub
    assert stub.refused_auth == 0


@pytest.fixture
async def calls(stub: TwilioRestStub) -> AsyncIterator[TwilioRestCalls]:
    """Our Calls API client, pointed at the stand-in."""
    calls = TwilioRestCalls(ACCOUNT, TOKEN, stub.url)
    try:
        yield calls
    finally:
        await calls.close()
