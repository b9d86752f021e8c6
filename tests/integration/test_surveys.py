"""The survey links over real sockets: `Surveys.routes()` served by uvicorn, clicked with httpx,
publishing to the session broker; and the whole loop through the ingest worker into SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import orjson
import pytest

from adapters.kafka import KafkaPublisher
from inbox.domain import ids
from inbox.domain.conversation import Conversation
from inbox.surveys import Surveys, read_survey_token
from inbox.thread_tokens import conversation_token
from infra.broker import free_port
from infra.kafka import ensure_topics, make_consumer
from infra.store import EventStore, open_event_store
from tests.conftest import SettingsFactory, TopicFactory
from tests.support import contact_event, produce, running_worker, serving, wait_until, worker_config

SECRET = b"integration-survey-secret-0123456789"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
ALICE = "Alice@Example.com"
CONVERSATION = "6f1c1c5e-8b0a-4c53-9a57-2f4d3b1e0a11"
LINK = re.compile(r"https?://\S+")


def links(text: str | None) -> dict[int, str]:
    """score -> link, from an email survey's text."""
    assert text is not None
    found = LINK.findall(text)
    return {int(link.rpartition("score=")[2]): link for link in found}


@dataclass
class Site:
    url: str
    topic: str
    bootstrap: str
    client: httpx.AsyncClient
    surveys: Surveys

    def survey(self, conversation: str = CONVERSATION, message: str = "m-1") -> dict[int, str]:
        return links(self.surveys.text("email", conversation, message))

    def page(self, conversation: str = CONVERSATION, message: str = "m-1") -> str:
        """The survey's page without a score: `/csat/{token}`."""
        return self.survey(conversation, message)[1].partition("?")[0]

    async def published(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        """The first `count` records of the topic as (key, event); waits for them."""
        consumer = make_consumer(self.bootstrap, None, self.topic)
        await consumer.start()
        records: list[tuple[str, dict[str, Any]]] = []
        try:
            async with asyncio.timeout(30):
                while len(records) < count:
                    batches = await consumer.getmany(timeout_ms=200)
                    for batch in batches.values():
                        records.extend((r.key.decode(), orjson.loads(r.value)) for r in batch)
        finally:
            await consumer.stop()
        return records

    async def only_the_marker_follows(self) -> None:
        """Proves nothing was published before: the first record on the topic is a marker."""
        marker = self.survey(message="marker")[3]
        assert (await self.client.get(marker)).status_code == 200
        [(_, event)] = await self.published(1)
        assert event["payload"]["survey"] == "marker"


@contextlib.asynccontextmanager
async def _site(
    bootstrap: str,
    topic: str,
    *,
    publisher_bootstrap: str | None = None,
    with_publisher: bool = True,
    emails: dict[str, str] | None = None,
) -> AsyncIterator[Site]:
    await ensure_topics(bootstrap, {topic: 1})
    publisher = KafkaPublisher(
        publisher_bootstrap or bootstrap, idempotence=False, topic=topic, timeout=3.0
    )
    known = {CONVERSATION: ALICE} if emails is None else emails

    async def customer_email(conversation_id: str) -> str | None:
        return known.get(conversation_id)

    port = free_port()
    surveys = Surveys(
        public_url=f"http://127.0.0.1:{port}/",
        secret=SECRET,
        publisher=publisher if with_publisher else None,
        customer_email=customer_email,
        clock=lambda: NOW,
    )
    try:
        async with (
            serving(surveys.routes(), port) as url,
            httpx.AsyncClient(timeout=20) as client,
        ):
            yield Site(url, topic, bootstrap, client, surveys)
    finally:
        await publisher.close()


@pytest.fixture
async def site(kafka_bootstrap: str, fresh_topic: TopicFactory) -> AsyncIterator[Site]:
    async with _site(kafka_bootstrap, fresh_topic("csat")) as served:
        yield served


# --------------------------------------------------------------------------- answers


async def test_a_click_publishes_the_answer_before_the_thank_you(site: Site) -> None:
    response = await site.client.get(site.survey()[4])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "Thank you" in response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    [(key, event)] = await site.published(1)
    assert key == "email:alice@example.com"
    assert event == {
        "schema": "contact-event/1",
        "event_id": f"csat:{CONVERSATION}:m-1",
        "occurred_at": "2026-11-27T10:00:00Z",
        "channel": "email",
        "type": "csat.submitted",
        "customer": {"email": "alice@example.com"},
        "thread": {"ref": conversation_token(CONVERSATION)},
        "payload": {"score": 4, "comment": None, "conversation": CONVERSATION, "survey": "m-1"},
    }


async def test_the_page_offers_five_choices_and_a_comment_form(site: Site) -> None:
    page = site.page()
    response = await site.client.get(page)
    assert response.status_code == 200
    token = page.rpartition("/")[2]
    for n in range(1, 6):
        assert f'href="{token}?score={n}"' in response.text
    assert f'<form method="post" action="{token}">' in response.text
    assert 'name="comment"' in response.text
    # The page's relative links are the email's links.
    assert str(httpx.URL(page).join(f"{token}?score=2")) == site.survey()[2]
    # Opening the page, or a link checker's HEAD on a scored link, answers nothing.
    assert (await site.client.head(site.survey()[1])).status_code == 200
    await site.only_the_marker_follows()


async def test_the_form_posts_a_score_and_a_comment(site: Site) -> None:
    response = await site.client.post(
        site.page(), data={"score": "2", "comment": "  slow, but solved  "}
    )
    assert response.status_code == 200, response.text
    assert "Thank you" in response.text
    [(_, event)] = await site.published(1)
    assert event["payload"]["score"] == 2
    assert event["payload"]["comment"] == "slow, but solved"
    assert event["event_id"] == f"csat:{CONVERSATION}:m-1"


async def test_a_multipart_form_is_taken_too(site: Site) -> None:
    response = await site.client.post(
        site.page(), files={"score": (None, "5"), "comment": (None, "great")}
    )
    assert response.status_code == 200, response.text
    [(_, event)] = await site.published(1)
    assert (event["payload"]["score"], event["payload"]["comment"]) == (5, "great")


async def test_json_in_json_out(site: Site) -> None:
    response = await site.client.post(site.page(), json={"score": 5, "comment": "thanks!"})
    assert response.status_code == 200, response.text
    assert response.json() == {"event_id": f"csat:{CONVERSATION}:m-1", "score": 5}
    [(_, event)] = await site.published(1)
    assert event["payload"]["comment"] == "thanks!"


async def test_the_same_survey_answered_twice_is_the_same_event(site: Site) -> None:
    survey = site.survey()
    assert (await site.client.get(survey[3])).status_code == 200
    assert (await site.client.get(survey[3])).status_code == 200
    # A change of mind, then a comment on the page: still the same survey.
    assert (await site.client.get(survey[5])).status_code == 200
    assert (await site.client.post(site.page(), data={"score": "1"})).status_code == 200
    records = await site.published(4)
    assert {event["event_id"] for _, event in records} == {f"csat:{CONVERSATION}:m-1"}
    assert [event["payload"]["score"] for _, event in records] == [3, 3, 5, 1]


# --------------------------------------------------------------------------- refusals


async def test_a_forged_or_altered_token_is_403_and_nothing_is_published(site: Site) -> None:
    token = site.page().rpartition("/")[2]
    body, _, mac = token.partition(".")
    other_body = site.page(conversation=str(uuid.uuid4())).rpartition("/")[2].partition(".")[0]
    forged = [
        f"{other_body}.{mac}",  # another conversation under this signature
        f"{body}.{mac[:-1]}{'B' if mac[-1] == 'A' else 'A'}",  # one character changed
        body,  # no signature
        "not-a-token",
    ]
    for bad in forged:
        url = f"{site.url}/csat/{bad}"
        clicked = await site.client.get(url, params={"score": "5"})
        assert clicked.status_code == 403, bad
        assert "not valid" in clicked.text
        assert (await site.client.get(url)).status_code == 403
        posted = await site.client.post(url, json={"score": 5})
        assert posted.status_code == 403
        assert posted.json()["error"]["code"] == "invalid_token"
    await site.only_the_marker_follows()


@pytest.mark.parametrize("score", ["0", "6", "abc", "", "4.5", "-1", "\uff11"])
async def test_a_bad_score_is_422_and_nothing_is_published(site: Site, score: str) -> None:
    clicked = await site.client.get(site.page(), params={"score": score})
    assert clicked.status_code == 422
    assert "1 to 5" in clicked.text
    form = await site.client.post(site.page(), data={"score": score})
    assert form.status_code == 422
    posted = await site.client.post(site.page(), json={"score": score})
    assert posted.status_code == 422
    assert posted.json()["error"]["code"] == "invalid_answer"
    await site.only_the_marker_follows()


async def test_bad_bodies_are_refused_and_nothing_is_published(site: Site) -> None:
    page = site.page()
    no_score = await site.client.post(page, data={"comment": "no score"})
    assert no_score.status_code == 422
    assert (await site.client.post(page, json=[5])).status_code == 400
    broken = await site.client.post(
        page, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400
    assert (await site.client.post(page, content=b"score=5")).status_code == 415
    too_long = await site.client.post(page, json={"score": 5, "comment": "x" * 2001})
    assert too_long.status_code == 422
    huge = await site.client.post(page, json={"score": 5, "comment": "x" * 20_000})
    assert huge.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):  # no Content-Length: the limit is counted while reading
            yield b"x" * 1024

    chunked = await site.client.post(
        page, content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert chunked.status_code == 413
    with_file = await site.client.post(page, files={"score": ("score.txt", b"5")})
    assert with_file.status_code == 400
    await site.only_the_marker_follows()


async def test_an_unknown_customer_is_404_and_nothing_is_published(site: Site) -> None:
    stranger = str(uuid.uuid4())
    response = await site.client.get(site.survey(conversation=stranger)[5])
    assert response.status_code == 404
    posted = await site.client.post(site.page(conversation=stranger), json={"score": 5})
    assert posted.status_code == 404
    await site.only_the_marker_follows()


async def test_kafka_down_is_503_and_the_retry_is_published_once(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    topic = fresh_topic("csat")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with _site(kafka_bootstrap, topic, publisher_bootstrap=dead) as down:
        click = down.survey()[4].removeprefix(down.url)  # the next server has another port
        response = await down.client.get(down.url + click)
        assert response.status_code == 503
        assert "try again" in response.text
        assert response.headers["retry-after"] == "30"
        posted = await down.client.post(down.page(), json={"score": 4})
        assert posted.status_code == 503
        assert posted.json()["error"]["code"] == "try_again"
    # The customer clicks again once Kafka is back: one event, the first on the topic.
    async with _site(kafka_bootstrap, topic) as up:
        assert (await up.client.get(up.url + click)).status_code == 200
        [(_, event)] = await up.published(1)
        assert event["payload"]["score"] == 4


async def test_without_a_publisher_answers_503(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    topic = fresh_topic("csat")
    async with _site(kafka_bootstrap, topic, with_publisher=False) as site:
        assert (await site.client.get(site.survey()[5])).status_code == 503
        # The page itself needs no Kafka.
        assert (await site.client.get(site.page())).status_code == 200
    async with _site(kafka_bootstrap, topic) as up:
        await up.only_the_marker_follows()


# --------------------------------------------------------------------------- the whole loop


@pytest.fixture
def store(settings: SettingsFactory, tmp_path: Path) -> Any:
    event_store = open_event_store(settings(f"sqlite:///{tmp_path / 'inbox.db'}"))
    yield event_store
    event_store.close()


def _email_of(store: EventStore, conversation_id: str) -> str | None:
    """What the read model will answer: the customer's email identity."""
    conversation = store.get(UUID(conversation_id))
    customer = store.get(UUID(conversation.customer_id))
    for key in customer.identities:
        if key.startswith("email:"):
            return str(key.removeprefix("email:"))
    return None


async def test_resolve_click_ingest_the_first_answer_counts(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore
) -> None:
    topic = fresh_topic("contact-events")
    await ensure_topics(kafka_bootstrap, {topic: 1, f"{topic}.dlq": 1})
    hello = contact_event(
        "<q1@example.com>",
        channel="email",
        customer={"email": ALICE},
        payload={"text": "where is my order?", "subject": "Order 4412"},
    )
    marker = contact_event("<bob@example.com>", channel="email", customer={"email": "bob@x.io"})

    port = free_port()
    publisher = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic, timeout=3.0)

    async def customer_email(conversation_id: str) -> str | None:
        return await asyncio.to_thread(_email_of, store, conversation_id)

    surveys = Surveys(
        public_url=f"http://127.0.0.1:{port}",
        secret=SECRET,
        publisher=publisher,
        customer_email=customer_email,
    )

    def conversation_of(email: str) -> Conversation | None:
        claim = store.get(ids.claim_id(f"email:{email}"))
        customer = None if claim is None else store.get(UUID(claim.customer_id))
        if customer is None or customer.current_conversation_id is None:
            return None
        found: Conversation = store.get(UUID(customer.current_conversation_id))
        return found

    def csat_events(conversation_id: UUID) -> list[Any]:
        return [e for e in store.events_of(conversation_id) if type(e).__name__ == "CsatSubmitted"]

    try:
        async with (
            running_worker(worker_config(kafka_bootstrap, topic), store),
            serving(surveys.routes(), port),
            httpx.AsyncClient(timeout=20) as client,
        ):
            await produce(kafka_bootstrap, topic, [hello])
            conversation = await wait_until(lambda: conversation_of("alice@example.com"))
            # What Commands.resolve does: resolve and queue the survey in one save.
            conversation.resolve(actor="agent-1", at="2026-11-27T09:30:00.000000Z")
            text = surveys.text("email", str(conversation.id), "survey-1")
            assert text is not None
            conversation.queue_survey(
                "survey-1", "email", text, actor="agent-1", at="2026-11-27T09:30:00.000000Z"
            )
            store.save(conversation)

            survey = links(text)
            assert (await client.get(survey[2])).status_code == 200
            assert (await client.get(survey[5])).status_code == 200  # a change of mind
            page = survey[1].partition("?")[0]
            assert (await client.post(page, data={"score": "4", "comment": "hi"})).status_code == (
                200
            )
            # The worker has taken everything before Bob's message once Bob is a customer.
            await produce(kafka_bootstrap, topic, [marker])
            await wait_until(lambda: conversation_of("bob@x.io"))
    finally:
        await publisher.close()

    [answer] = csat_events(conversation.id)
    assert (answer.score, answer.comment, answer.channel) == (2, None, "email")
    assert answer.source_event_id == f"csat:{conversation.id}:survey-1"
    assert read_survey_token(SECRET, page.rpartition("/")[2]).conversation_id == str(
        conversation.id
    )
    after = store.get(conversation.id)
    assert after.status == "resolved"  # an answer is not a new contact
    assert not after.survey_pending
