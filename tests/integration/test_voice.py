"""Whole calls through the IVR over real sockets: the voice routes served by uvicorn, publishing
to the session broker, driven by the Twilio-like call simulator (tests/voice_sim.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from twilio.request_validator import RequestValidator

from adapters.kafka import KafkaPublisher
from infra.broker import free_port
from infra.kafka import ensure_topics, make_consumer
from ivr.cli import check_command, parse_queues
from ivr.flow import QueueInfo, answered_url
from ivr.menu import BUNDLED_EXAMPLE, InvalidMenu, load_bundled_example, load_menu
from ivr.twiml import agent_leg
from ivr.voice import voice_routes
from tests.conftest import TopicFactory
from tests.support import serving
from tests.voice_sim import (
    AgentAnswers,
    CallSimulator,
    FakeClock,
    HangUp,
    Hold,
    LeaveMessage,
    Press,
    ScriptItem,
    Silence,
    Speak,
)

TOKEN = "0123456789abcdef0123456789abcdef"
# Friday 27 November 2026, 11:00 in Berlin: open; Sunday: closed.
OPEN = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
SUNDAY = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
MENU = load_bundled_example()


@dataclass
class Voice:
    url: str
    topic: str
    bootstrap: str
    client: httpx.AsyncClient
    clock: FakeClock
    calls: int = 0

    def simulator(self, caller: str = "+14155550123") -> CallSimulator:
        self.calls += 1
        sid = f"CA{self.calls:032x}"
        return CallSimulator(self.client, self.url, TOKEN, self.clock, sid, caller=caller)

    async def call(self, script: list[ScriptItem], **kwargs: Any) -> tuple[CallSimulator, Any]:
        sim = self.simulator(**kwargs)
        return sim, await sim.call(script)

    async def published(self, count: int) -> list[dict[str, Any]]:
        """The first `count` events of the topic; waits for them, and checks no more follow."""
        consumer = make_consumer(self.bootstrap, None, self.topic)
        await consumer.start()
        records: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(30):
                while len(records) < count:
                    batches = await consumer.getmany(timeout_ms=200)
                    for batch in batches.values():
                        records.extend(orjson.loads(r.value) for r in batch)
            extra = await consumer.getmany(timeout_ms=300)
            records.extend(orjson.loads(r.value) for b in extra.values() for r in b)
        finally:
            await consumer.stop()
        assert len(records) == count, [(e["type"], e["event_id"]) for e in records]
        return records


async def _stub_queue_info(call_sid: str, queue: str) -> QueueInfo:
    return QueueInfo(position=2, estimate_seconds=150.0, agents_available=1)


@contextlib.asynccontextmanager
async def _voice(
    bootstrap: str,
    topic: str,
    *,
    start: datetime = OPEN,
    auth_token: str | None = TOKEN,
    publisher_bootstrap: str | None = None,
) -> AsyncIterator[Voice]:
    await ensure_topics(bootstrap, {topic: 1})
    publisher = KafkaPublisher(
        publisher_bootstrap or bootstrap, idempotence=False, topic=topic, timeout=3.0
    )
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    clock = FakeClock(start)
    routes = voice_routes(
        publisher,
        menu=MENU,
        auth_token=auth_token,
        public_url=public_url,
        queue_info=_stub_queue_info,
        clock=clock,
    )
    try:
        async with serving(routes, port) as url, httpx.AsyncClient(timeout=20) as client:
            yield Voice(url, topic, bootstrap, client, clock)
    finally:
        await publisher.close()


@pytest.fixture
async def voice(kafka_bootstrap: str, fresh_topic: TopicFactory) -> AsyncIterator[Voice]:
    async with _voice(kafka_bootstrap, fresh_topic("voice")) as v:
        yield v


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["event_id"].partition(":")[2]) for e in events]


# --------------------------------------------------------------------------- whole calls


async def test_by_digit_to_billing_answered_by_an_agent(voice: Voice) -> None:
    leg = agent_leg("billing", answered_url(voice.url, "billing", "alice"))
    sim, call = await voice.call(
        [Press("1"), Press("1"), Hold(), AgentAnswers(leg, talk_seconds=120)]
    )
    assert "For billing, press 1" in call.said()
    assert "You are number 2 in line." in call.said()
    assert "about 3 minutes" in call.said()  # the estimate, rounded up
    assert call.ended_by == "ivr"  # goodbye after the agent hung up
    events = await voice.published(8)
    assert kinds(events) == [
        ("call.started", "started"),
        ("ivr.selected", "ivr:1"),
        ("ivr.selected", "ivr:1.h"),
        ("ivr.selected", "ivr:1.h.1"),
        ("call.queued", "queued:1.h.1"),
        ("call.answered", "answered"),
        ("call.answered", "answered"),  # again from the bridged queue result: one id
        ("call.ended", "ended"),
    ]
    assert {e["customer"]["phone"] for e in events} == {"+14155550123"}
    assert events[4]["payload"]["skill"] == "billing"
    assert events[5]["payload"]["agent"] == "alice"
    assert events[7]["payload"]["talk_seconds"] == 120
    assert all(p.status == 200 for p in sim.posted)


async def test_by_speech_in_german_then_hung_up_while_queued(voice: Voice) -> None:
    _, call = await voice.call(
        [Speak("Deutsch bitte"), Speak("Ich habe eine Frage zur Rechnung"), Hold(), HangUp()]
    )
    assert "Sie sind an Position 2 in der Warteschlange." in call.said()
    assert call.ended_by == "caller"
    events = await voice.published(7)
    assert kinds(events)[4:] == [
        ("call.queued", "queued:2.h.1"),
        ("call.abandoned", "abandoned"),  # the Enqueue action's QueueResult=hangup
        ("call.abandoned", "abandoned"),  # the status callback: the same event
    ]
    assert events[4]["payload"]["language"] == "de"
    assert events[5]["payload"]["queue"] == "billing"
    assert events[5]["payload"] == events[6]["payload"]
    assert events[1]["payload"]["speech"] == "Deutsch bitte"


async def test_invalid_input_is_repeated_then_the_default_is_taken(voice: Voice) -> None:
    _, call = await voice.call([Press("1"), Press("7"), Silence(), Press("8"), HangUp()])
    assert call.said().count("Sorry, I did not get that.") == 2
    assert call.said().count("For billing, press 1") == 3
    events = await voice.published(7)
    assert kinds(events)[3:5] == [("ivr.selected", "ivr:1.h.d"), ("call.queued", "queued:1.h.d")]
    assert events[4]["payload"]["queue"] == "default"


async def test_after_hours_a_voicemail_is_left(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    async with _voice(kafka_bootstrap, fresh_topic("voice"), start=SUNDAY) as voice:
        _, call = await voice.call([Press("1"), LeaveMessage(seconds=20)])
        assert "Our hotline is open Monday to Friday" in call.said()
        assert "we have your message" in call.said()
        events = await voice.published(6)
    assert [e["type"] for e in events] == [
        "call.started",
        "ivr.selected",
        "ivr.selected",
        "message.received",  # the recording status callback
        "message.received",  # the <Record> action: the same event
        "call.ended",
    ]
    assert events[2]["payload"]["choice"] == "closed"
    message = events[3]
    assert message["channel"] == "voice"
    assert message["payload"]["text"] == "(voicemail)"
    assert message["payload"]["attachments"][0]["ref"].startswith("https://api.twilio.com/")
    assert message["event_id"] == events[4]["event_id"]
    assert events[5]["payload"]["ended_in"] == "voicemail"


async def test_callback_while_queued_with_a_keyed_in_number(voice: Voice) -> None:
    _, call = await voice.call(
        [Press("1"), Press("2"), Press("*"), Press("4155550199"), Press("1")]
    )
    said = call.said()
    assert "We can call you back at 4, 1, 5, 5, 5, 5, 0, 1, 2, 3." in said
    assert "You entered 4, 1, 5, 5, 5, 5, 0, 1, 9, 9." in said
    assert "We will call you back at" in said
    events = await voice.published(7)
    assert kinds(events)[4:] == [
        ("call.queued", "queued:1.h.2"),
        ("callback.requested", "callback"),
        ("call.ended", "ended"),  # left the queue for a callback: no abandon
    ]
    assert events[5]["payload"]["number"] == "+14155550199"
    assert events[5]["payload"]["queue"] == "tech"
    assert events[6]["payload"]["ended_in"] == "callback"


async def test_voicemail_from_the_menu(voice: Voice) -> None:
    await voice.call([Press("3"), Press("4"), LeaveMessage()])  # Spanish, then a message
    events = await voice.published(7)
    assert events[3]["payload"]["action"] == "voicemail"
    assert events[4]["type"] == "message.received"
    assert events[4]["payload"]["language"] == "es"


async def test_a_hang_up_in_the_ivr_is_recorded_as_such(voice: Voice) -> None:
    await voice.call([Press("1"), HangUp()])
    events = await voice.published(4)
    assert events[-1]["type"] == "call.ended"
    assert events[-1]["payload"]["ended_in"] == "ivr"
    assert "call.abandoned" not in [e["type"] for e in events]


# --------------------------------------------------------------------------- Twilio retrying


async def test_a_retried_request_gets_the_same_twiml_and_no_new_events(voice: Voice) -> None:
    sim, _ = await voice.call([Press("1"), Press("2"), HangUp()])
    before = await voice.published(7)
    choice = next(p for p in sim.posted if p.params.get("Digits") == "2")
    again = await sim.repeat(choice)
    assert again.status_code == 200
    assert again.text == choice.text
    after = await voice.published(9)  # published again (Twilio must get its answer) ...
    assert {e["event_id"] for e in after} == {e["event_id"] for e in before}  # ... nothing new


async def test_an_unknown_step_starts_the_menu_again(voice: Voice) -> None:
    sim = voice.simulator()
    response = await sim.post(
        voice.url + "/twilio/voice/gather?node=gone&lang=en&path=1.h",
        sim._params(Digits="1"),
    )
    assert response.status_code == 200
    assert "Welcome to Example Shop" in response.text
    [event] = await voice.published(1)
    assert event["payload"]["action"] == "restart"


# --------------------------------------------------------------------------- refusals


async def test_bad_signature_is_403_and_nothing_is_published(voice: Voice) -> None:
    sim = voice.simulator()
    url = voice.url + "/twilio/voice"
    params = sim._params(CallStatus="ringing")
    missing = await voice.client.post(url, data=params)
    assert missing.status_code == 403
    wrong = await voice.client.post(url, data=params, headers={"X-Twilio-Signature": "x" * 28})
    assert wrong.status_code == 403
    # signed for another step than the one posted to
    elsewhere = RequestValidator(TOKEN).compute_signature(url + "/status", params)
    moved = await voice.client.post(url, data=params, headers={"X-Twilio-Signature": elsewhere})
    assert moved.status_code == 403
    response = await sim.post(url, params)  # a real one: the only event that follows
    assert response.status_code == 200
    [event] = await voice.published(1)
    assert event["type"] == "call.started"


async def test_unconfigured_twilio_answers_503(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    async with _voice(kafka_bootstrap, fresh_topic("voice"), auth_token=None) as voice:
        sim = voice.simulator()
        response = await voice.client.post(
            voice.url + "/twilio/voice", data=sim._params(), headers={"X-Twilio-Signature": "x"}
        )
        assert response.status_code == 503
        assert "TWILIO_AUTH_TOKEN" in response.text


async def test_kafka_down_is_503_and_the_retry_is_answered_once_kafka_is_back(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    topic = fresh_topic("voice")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with _voice(kafka_bootstrap, topic, publisher_bootstrap=dead) as down:
        sim = down.simulator()
        response = await sim.post(down.url + "/twilio/voice", sim._params(CallStatus="ringing"))
        assert response.status_code == 503
        assert "try again" in response.text
    async with _voice(kafka_bootstrap, topic) as up:
        sim = up.simulator()  # the same CallSid as before
        response = await sim.post(up.url + "/twilio/voice", sim._params(CallStatus="ringing"))
        assert response.status_code == 200
        [event] = await up.published(1)
        assert event["event_id"] == f"{sim.call_sid}:started"


# --------------------------------------------------------------------------- the menu file


def test_the_check_command_names_file_place_and_message(tmp_path: Path) -> None:
    bad = tmp_path / "menu.toml"
    text = BUNDLED_EXAMPLE.read_text(encoding="utf-8").replace('digit = "2"', 'digit = "1"', 1)
    bad.write_text(text, encoding="utf-8")
    out = io.StringIO()
    assert check_command(str(bad), None, out=out) == 1
    assert out.getvalue().splitlines() == [
        f"{bad}: nodes.welcome.options[1].digit: duplicate digit 1: already used by options[0]"
    ]
    ok = io.StringIO()
    assert (
        check_command(str(BUNDLED_EXAMPLE), parse_queues("billing,tech,supervisors"), out=ok) == 0
    )
    queues = io.StringIO()
    assert check_command(str(BUNDLED_EXAMPLE), parse_queues("billing"), out=queues) == 1
    assert "unknown queue 'tech'" in queues.getvalue()


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidMenu) as missing:
        load_menu(tmp_path / "nope.toml")
    assert missing.value.problems[0].place == "file"
    broken = tmp_path / "broken.toml"
    broken.write_text("[menu\nstart = 1", encoding="utf-8")
    with pytest.raises(InvalidMenu) as syntax:
        load_menu(broken)
    assert syntax.value.problems[0].place == "toml"
    assert "line 1" in syntax.value.problems[0].message
