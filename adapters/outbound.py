"""What a channel needs to send an agent's reply, and what it answers.

The delivery process (inbox/delivery.py) builds an `OutboundMessage` for every queued reply and
hands it to the `ChannelSender` of its channel. A sender only translates and talks to its
service; retries, backoff and recording the outcome are the delivery process's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class OutboundMessage:
    message_id: str  # ours: ReplyQueued.message_id, stable across retries
    conversation_id: str
    channel: str  # email | sms | whatsapp | messenger | instagram | chat
    text: str
    to: str  # the customer's address on that channel: email, E.164 phone, visitor id, social id
    customer_name: str | None = None
    # email threading: the subject to answer and the customer's message ids, newest first
    subject: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    # when the customer last wrote on this channel (WhatsApp's 24-hour service window)
    last_inbound_at: str | None = None
    # the channel account the customer wrote to (our email address, phone number, page id...)
    via: str | None = None
    attempt: int = 1
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    provider_id: str | None  # the id the service gave the message (Twilio SID, wamid, ...)
    status: str = "sent"  # sent | delivered (chat pushes straight to the visitor)


class TemporaryFailure(Exception):
    """The service is down or busy: try again later (with backoff)."""


class PermanentFailure(Exception):
    """The service refused this message for good (the reason is shown to the agent)."""


class ChannelSender(Protocol):
    channels: frozenset[str]

    async def send(self, message: OutboundMessage) -> SendResult: ...
