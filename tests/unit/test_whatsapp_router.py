"""A WhatsApp reply goes back the way the customer came."""

from __future__ import annotations

import pytest

from adapters.outbound import OutboundMessage, PermanentFailure, SendResult
from adapters.senders import WhatsAppRouter


class Recording:
    channels = frozenset({"whatsapp"})

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_id=self.name)


def message(via: str | None) -> OutboundMessage:
    return OutboundMessage(
        message_id="m1",
        conversation_id="c1",
        channel="whatsapp",
        text="hi",
        to="+14155550123",
        via=via,
    )


@pytest.mark.parametrize(
    ("via", "expected"),
    [
        ("whatsapp:+15005550006", "twilio"),
        ("+15005550006", "twilio"),
        ("106540352242922", "meta"),
        (None, "meta"),
    ],
)
async def test_the_reply_goes_back_the_way_the_customer_came(
    via: str | None, expected: str
) -> None:
    twilio, meta = Recording("twilio"), Recording("meta")
    result = await WhatsAppRouter(twilio=twilio, meta=meta).send(message(via))
    assert result.provider_id == expected


async def test_without_the_right_sender_the_reply_fails_clearly() -> None:
    router = WhatsAppRouter(twilio=None, meta=Recording("meta"))
    with pytest.raises(PermanentFailure, match="no WhatsApp sender"):
        await router.send(message("whatsapp:+15005550006"))
    assert (
        await WhatsAppRouter(twilio=Recording("twilio"), meta=None).send(message(None))
    ).provider_id == "twilio"
