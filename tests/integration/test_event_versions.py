"""Events live forever: one stored in an old version is upcast when read, by the aggregate and
by the projections that read stored state directly."""

from __future__ import annotations

from typing import Any

import orjson
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from inbox.domain import ids
from inbox.domain.agent import Agent
from inbox.domain.conversation import Conversation
from infra.store import EventStore
from projections import timeline
from projections.db import open_read_models
from projections.replay import PROJECTIONS
from projections.runner import ProjectionRunner
from tests.conftest import SettingsFactory


def test_a_version_1_message_is_read_with_no_via(store: EventStore) -> None:
    conversation = Conversation(
        customer_id="c-1",
        channel="sms",
        queue=None,
        previous=None,
        source_event_id="e-0",
        at="2026-11-27T09:00:00.000000Z",
    )
    store.save(conversation)
    v1_state: dict[str, Any] = {
        "timestamp": "2026-11-27T09:00:01+00:00",
        "channel": "sms",
        "message_id": "SM1",
        "text": "hello",
        "subject": None,
        "html": None,
        "attachments": [],
        "thread_ref": None,
        "in_reply_to": [],
        "automatic": False,
        "source_event_id": "SM1",
        "at": "2026-11-27T09:00:01.000000Z",
    }
    store.recorder.insert_events(
        [
            StoredEvent(
                originator_id=conversation.id,
                originator_version=2,
                topic=get_topic(Conversation.MessageReceived),
                state=orjson.dumps(v1_state),
            )
        ]
    )
    (event,) = [
        e for e in store.events_of(conversation.id) if isinstance(e, Conversation.MessageReceived)
    ]
    assert event.via is None
    assert event.text == "hello"
    assert store.get(conversation.id).inbound_count == 1


def test_a_version_1_delivery_status_is_read_as_version_2(
    store: EventStore, settings: SettingsFactory, database_url: str
) -> None:
    conversation = Conversation(
        customer_id="c-1",
        channel="sms",
        queue=None,
        previous=None,
        source_event_id="e-1",
        at="2026-11-27T09:00:00.000000Z",
    )
    conversation.queue_reply(
        "ours-1", "sms", "on its way", actor="ann", at="2026-11-27T09:01:00.000000Z"
    )
    store.save(conversation)
    # As version 1 stored it: no provider_id, and no class_version key (eventsourcing omits 1).
    v1_state: dict[str, Any] = {
        "timestamp": "2026-11-27T09:02:00+00:00",
        "channel": "sms",
        "message_id": "ours-1",
        "status": "sent",
        "error": None,
        "source_event_id": "delivery:ours-1:sent",
        "at": "2026-11-27T09:02:00.000000Z",
    }
    store.recorder.insert_events(
        [
            StoredEvent(
                originator_id=conversation.id,
                originator_version=3,
                topic=get_topic(Conversation.DeliveryStatusRecorded),
                state=orjson.dumps(v1_state),
            )
        ]
    )
    loaded = store.get(conversation.id)
    (event,) = [
        e
        for e in store.events_of(conversation.id)
        if isinstance(e, Conversation.DeliveryStatusRecorded)
    ]
    assert event.provider_id is None
    assert event.status == "sent"
    assert loaded.version == 3
    assert loaded.provider_ids == {}

    # A version 2 receipt recorded afterwards still lands under our message id.
    loaded.record_delivery(
        channel="sms",
        message_id="ours-1",
        provider_id="SM123",
        status="sent",
        error=None,
        source_event_id="delivery:ours-1:sent:2",
        at="2026-11-27T09:03:00.000000Z",
    )
    loaded.record_delivery(
        channel="sms",
        message_id="SM123",
        status="delivered",
        error=None,
        source_event_id="status:SM123:delivered",
        at="2026-11-27T09:04:00.000000Z",
    )
    store.save(loaded)
    statuses = [
        (e.message_id, e.provider_id, e.status)
        for e in store.events_of(conversation.id)
        if isinstance(e, Conversation.DeliveryStatusRecorded)
    ]
    assert statuses == [
        ("ours-1", None, "sent"),
        ("ours-1", "SM123", "sent"),
        ("ours-1", "SM123", "delivered"),
    ]

    # Projections read the stored state of both versions.
    read_models = open_read_models(settings(database_url))
    runner = ProjectionRunner(store, read_models, [f() for f in PROJECTIONS.values()])
    while runner.run_once(1000):
        pass
    detail = timeline.get_conversation(read_models, str(conversation.id))
    assert detail is not None
    deliveries = [e for e in detail["timeline"] if e["kind"] == "delivery"]
    assert [e["data"].get("status") for e in deliveries] == ["sent", "sent", "delivered"]
    read_models.close()


def test_a_version_1_agent_is_read_with_no_voice_endpoint(store: EventStore) -> None:
    agent_id = ids.agent_id("ann")
    v1_registered: dict[str, Any] = {
        "timestamp": "2026-11-27T09:00:00+00:00",
        "originator_topic": get_topic(Agent),
        "agent_id": "ann",
        "name": "Ann",
        "role": "agent",
        "skills": ["billing"],
        "languages": ["en"],
        "capacity": {"voice": 1},
        "token_hash": "0" * 64,
        "actor": "admin",
        "at": "2026-11-27T09:00:00.000000Z",
    }
    v1_changed = {
        **{k: v for k, v in v1_registered.items() if k not in ("originator_topic", "agent_id")},
        "token_hash": None,
        "name": "Ann B.",
    }
    del v1_changed["token_hash"]
    store.recorder.insert_events(
        [
            StoredEvent(agent_id, 1, get_topic(Agent.Registered), orjson.dumps(v1_registered)),
            StoredEvent(agent_id, 2, get_topic(Agent.ProfileChanged), orjson.dumps(v1_changed)),
        ]
    )
    agent = store.get(agent_id)
    assert isinstance(agent, Agent)
    assert agent.voice_to is None
    assert agent.name == "Ann B."
    assert agent.skills == ["billing"]
