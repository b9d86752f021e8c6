"""WhatsApp reaches us two ways, through Twilio and through Meta's Cloud API; a reply goes
back the way the customer came, which `via` tells (a Twilio number `whatsapp:+1...` or `+1...`,
or Meta's numeric phone_number_id)."""

from __future__ import annotations

from adapters.outbound import ChannelSender, OutboundMessage, PermanentFailure, SendResult


class WhatsAppRouter:
    channels = frozenset({"whatsapp"})

    def __init__(self, *, twilio: ChannelSender | None, meta: ChannelSender | None) -> None:
        self._twilio = twilio
        self._meta = meta

    def _sender(self, via: str | None) -> ChannelSender | None:
        if via is not None and (via.startswith(("whatsapp:", "+"))):
            return self._twilio
        if via is not None and via.isdigit():
            return self._meta
        # Unknown origin: whichever one is configured, Meta's own API first.
        return self._meta or self._twilio

    async def send(self, message: OutboundMessage) -> SendResult:
        sender = self._sender(message.via)
        if sender is None:
            raise PermanentFailure(
                f"no WhatsApp sender is configured for {message.via or 'this customer'}"
            )
        return await sender.send(message)
