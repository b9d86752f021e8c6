"""Agents' replies out through Meta's Graph API: WhatsApp Cloud API, Messenger, Instagram.

WhatsApp: `POST {graph}/{version}/{phone_number_id}/messages` with a free-form text message,
allowed only within 24 hours of the customer's last message (the customer service window);
outside it WhatsApp accepts only approved template messages, so the reply is refused here
without a request. Messenger and Instagram: the Send API, `POST {graph}/{version}/me/messages`,
with the page's (or Instagram account's) access token.

Graph answers errors as `{"error": {"message", "type", "code", "error_subcode", "is_transient"}}`.
Rate limits and transient errors (even when sent with status 400) are temporary; other 4xx are
permanent and carry Graph's message to the agent.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx

from adapters.outbound import OutboundMessage, PermanentFailure, SendResult, TemporaryFailure
from inbox.domain.time import Clock, system_clock
from inbox.identity import InvalidIdentity, normalise_phone

GRAPH_URL = "https://graph.facebook.com"
GRAPH_VERSION = "v21.0"
SERVICE_WINDOW = timedelta(hours=24)
# Longest text each channel takes in one message.
MAX_TEXT = {"whatsapp": 4096, "messenger": 2000, "instagram": 1000}
# Graph error codes that mean "too many requests" or "try again": application and page
# rate limits, WhatsApp throughput and pair rate limits, temporary service errors.
_RETRYABLE_CODES = frozenset({1, 2, 4, 17, 32, 341, 613, 80007, 130429, 131000, 131048, 131056})


class MetaSender:
    """A ChannelSender (adapters.outbound) for whatsapp, messenger and instagram."""

    channels = frozenset({"whatsapp", "messenger", "instagram"})

    def __init__(
        self,
        graph_url: str = GRAPH_URL,
        access_token: str = "",
        whatsapp_phone_number_id: str | None = None,
        clock: Clock = system_clock,
        *,
        version: str = GRAPH_VERSION,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._base = f"{graph_url.rstrip('/')}/{version}"
        self._token = access_token
        self._phone_number_id = whatsapp_phone_number_id
        self._clock = clock
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> MetaSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.channel not in self.channels:
            raise PermanentFailure(f"MetaSender does not send on channel {message.channel!r}")
        if not self._token:
            raise PermanentFailure("Meta is not configured on this server (META_ACCESS_TOKEN)")
        if not message.text.strip():
            raise PermanentFailure("the reply is empty")
        limit = MAX_TEXT[message.channel]
        if len(message.text) > limit:
            raise PermanentFailure(
                f"the reply is {len(message.text)} characters; {message.channel} takes at most "
                f"{limit} in one message"
            )
        if message.channel == "whatsapp":
            url, body = self._whatsapp(message)
        else:
            url = f"{self._base}/me/messages"
            body = {
                "recipient": {"id": message.to},
                "messaging_type": "RESPONSE",
                "message": {"text": message.text},
            }
        data = await self._post(url, body)
        return SendResult(provider_id=_message_id(data))

    def _whatsapp(self, message: OutboundMessage) -> tuple[str, dict[str, Any]]:
        self._check_window(message)
        phone_number_id = message.via or self._phone_number_id
        if not phone_number_id:
            raise PermanentFailure(
                "no WhatsApp phone number to send from (the conversation names none and no "
                "default phone_number_id is configured)"
            )
        try:
            wa_id = normalise_phone(message.to).lstrip("+")
        except InvalidIdentity:
            raise PermanentFailure(f"not a WhatsApp phone number: {message.to[:40]!r}") from None
        body = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": wa_id,
            "type": "text",
            "text": {"preview_url": False, "body": message.text},
        }
        return f"{self._base}/{phone_number_id}/messages", body

    def _check_window(self, message: OutboundMessage) -> None:
        last = _parse_time(message.last_inbound_at)
        now = self._clock()
        if last is None or now - last > SERVICE_WINDOW:
            since = (
                "the customer has not written on WhatsApp"
                if last is None
                else f"the customer last wrote on WhatsApp at {last.isoformat()}"
            )
            raise PermanentFailure(
                f"outside WhatsApp's 24-hour customer service window ({since}): WhatsApp only "
                "takes an approved template message now"
            )

    async def _post(self, url: str, body: dict[str, Any]) -> Any:
        try:
            response = await self._client.post(
                url, json=body, headers={"Authorization": f"Bearer {self._token}"}
            )
        except httpx.TransportError as exc:
            raise TemporaryFailure(f"Graph API unreachable: {exc!r}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        status = response.status_code
        if status < 300:
            return data
        error = data.get("error") if isinstance(data, dict) else None
        error = error if isinstance(error, dict) else {}
        text = error.get("message") if isinstance(error.get("message"), str) else None
        code = error.get("code")
        reason = f"Graph API {status}" + (f" (code {code})" if code is not None else "")
        reason += f": {text}" if text else ""
        if (
            status >= 500
            or status == 429
            or error.get("is_transient") is True
            or code in _RETRYABLE_CODES
        ):
            raise TemporaryFailure(reason)
        raise PermanentFailure(reason)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def _message_id(data: Any) -> str | None:
    """WhatsApp answers `{"messages": [{"id": "wamid..."}]}`, the Send API
    `{"message_id": "m_..."}`. The message went either way, so a missing id is not an error."""
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        wamid = messages[0].get("id")
        if isinstance(wamid, str):
            return wamid
    mid = data.get("message_id")
    return mid if isinstance(mid, str) else None
