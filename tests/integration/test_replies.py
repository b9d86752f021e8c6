"""Which channel a reply goes through when the agent names none: the channel the customer last
wrote on, never a call's (no reply can go through one). Against the real event store."""

from __future__ import annotations

import pytest

from inbox.domain.conversation import Conversation
from inbox.domain.errors import ConversationStateError
from tests.integration.test_distribution import (
    Center,
    center,  # noqa: F401  (the fixture)
)

CALLER = {"channel": "voice", "email": "caller@example.com"}


def _replies(center: Center, conversation: Conversation) -> list[str]:  # noqa: F811
    return [
        e.channel
        for e in center.store.events_of(conversation.id)
        if isinstance(e, Conversation.ReplyQueued)
    ]


def test_a_reply_after_a_call_goes_through_the_channel_the_customer_last_wrote_on(
    center: Center,  # noqa: F811
) -> None:
    center.contact("m1", channel="email", email="caller@example.com", text="my order?")
    conversation = center.contact(
        "CA1:s", type="call.started", payload={"call_sid": "CA1"}, **CALLER
    )
    assert conversation.last_inbound_channel == "voice"
    center.commands.reply(conversation.id, "It ships today.", channel=None, actor="ann")
    assert _replies(center, conversation) == ["email"]
    # named, it goes where the agent says
    center.commands.reply(conversation.id, "Tracking: 1Z.", channel="sms", actor="ann")
    assert _replies(center, conversation) == ["email", "sms"]


def test_a_conversation_of_calls_only_needs_the_channel_named(
    center: Center,  # noqa: F811
) -> None:
    conversation = center.contact(
        "CA2:s", type="call.started", payload={"call_sid": "CA2"}, **CALLER
    )
    before = center.store.max_notification_id()
    with pytest.raises(ConversationStateError, match="name the channel"):
        center.commands.reply(conversation.id, "Call us back?", channel=None, actor="ann")
    assert center.store.max_notification_id() == before  # nothing recorded
    center.commands.reply(conversation.id, "Texting you the details.", channel="sms", actor="ann")
    assert _replies(center, conversation) == ["sms"]
