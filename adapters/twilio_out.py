"""SMS and WhatsApp through Twilio, outbound: an agent's reply as one `Messages.create`.

`TwilioSender` is the `ChannelSender` of the `sms` and `whatsapp` channels. It uses twilio's own
REST client with its asyncio transport (`AsyncTwilioHttpClient`, `create_async`), pointed at
`TWILIO_API_BASE` when one is given (tests run a local stand-in there). Each message names the
status callback `PUBLIC_URL/twilio/messaging/status`, whose receipts come back as
`delivery.status` contact events keyed by the MessageSid returned here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

from adapters.outbound import OutboundMessage, PermanentFailure, SendResult, TemporaryFailure
from inbox.identity import InvalidIdentity, normalise_phone

log = logging.getLogger(__name__)

STATUS_CALLBACK_PATH = "/twilio/messaging/status"
# WhatsApp lets a business answer freely for 24 hours after the customer's last message; after
# that only pre-approved templates go through (Twilio error 63016).
WHATSAPP_WINDOW = timedelta(hours=24)
_WHATSAPP = "whatsapp:"
_TOO_MANY_REQUESTS = 429

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _AsyncHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio is untyped
    """twilio's aiohttp transport, sending the credentials as an Authorization header.

    Given credentials, `AsyncTwilioHttpClient` builds an `aiohttp.BasicAuth`, which aiohttp 3.14
    deprecates with a warning on every request; the header it would have produced is the same.
    """

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - twilio's HttpClient signature
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        if auth is not None:
            headers = {**(headers or {}), "Authorization": aiohttp.encode_basic_auth(*auth)}
        response: TwilioResponse = await super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=None,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )
        return response


class RestClient:
    """Twilio's REST client on an aiohttp session of ours, pointed at `api_base` when given
    (TWILIO_API_BASE: a local stand-in in tests). Built on first use, inside the running
    event loop: the session belongs to it. Call `close()` at shutdown."""

    def __init__(
        self, account_sid: str, auth_token: str, api_base: str | None, *, timeout: float
    ) -> None:
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._api_base = api_base.rstrip("/") if api_base else None
        self._timeout = timeout
        self._http: _AsyncHttpClient | None = None
        self._client: Any = None

    def __call__(self) -> Any:
        if self._client is None:
            self._http = _AsyncHttpClient(timeout=self._timeout)
            client = Client(self._account_sid, self._auth_token, http_client=self._http)
            if self._api_base is not None:
                client.api.base_url = self._api_base
                # TWILIO_EDGE / TWILIO_REGION would rewrite the stand-in's host name.
                client.edge = client.region = None
            self._client = client
        return self._client

    async def close(self) -> None:
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.close()


class TwilioSender:
    """Sends sms and whatsapp replies with Twilio's Messages API. Call `close()` at shutdown."""

    channels = frozenset({"sms", "whatsapp"})

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        public_url: str,
        api_base: str | None = None,
        sms_from: str | None = None,
        whatsapp_from: str | None = None,
        timeout: float = 15.0,
        clock: Clock = _utc_now,
    ) -> None:
        self._rest = RestClient(account_sid, auth_token, api_base, timeout=timeout)
        self._from = {"sms": sms_from, "whatsapp": whatsapp_from}
        self.status_callback = public_url.rstrip("/") + STATUS_CALLBACK_PATH
        self._clock = clock

    async def close(self) -> None:
        await self._rest.close()

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.channel not in self.channels:
            raise PermanentFailure(f"TwilioSender does not send {message.channel} messages")
        if message.channel == "whatsapp":
            self._check_whatsapp_window(message)
        to, from_ = self._addresses(message)
        try:
            created = await self._rest().messages.create_async(
                to=to,
                from_=from_,
                body=message.text,
                status_callback=self.status_callback,
            )
        except TwilioRestException as exc:
            raise _failure(exc.status, exc.code, _rest_message(exc)) from exc
        except TwilioServiceException as exc:
            raise _failure(exc.status, exc.code, exc.detail or exc.title) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TemporaryFailure(f"Twilio unreachable: {exc!r}") from exc
        except ValueError as exc:  # a 2xx answer that is not JSON
            # Twilio may have created the message: retrying could send it twice.
            raise PermanentFailure(f"Twilio's answer was not JSON: {exc}") from exc
        sid = getattr(created, "sid", None)
        if not isinstance(sid, str) or not sid:
            raise PermanentFailure("Twilio accepted the message but returned no MessageSid")
        log.info("sent %s %s as %s", message.channel, message.message_id, sid)
        return SendResult(provider_id=sid)

    def _check_whatsapp_window(self, message: OutboundMessage) -> None:
        last = _parse_time(message.last_inbound_at)
        if last is None:
            raise PermanentFailure(
                "WhatsApp: the customer has not written on WhatsApp (no last inbound time); "
                "outside the 24-hour window only a template message can be sent"
            )
        if self._clock() - last > WHATSAPP_WINDOW:
            raise PermanentFailure(
                f"WhatsApp: the customer last wrote at {last.isoformat()}, more than 24 hours "
                "ago; outside the 24-hour window only a template message can be sent"
            )

    def _addresses(self, message: OutboundMessage) -> tuple[str, str]:
        try:
            to = normalise_phone(message.to)
        except InvalidIdentity as exc:
            raise PermanentFailure(f"cannot send {message.channel} to {exc}") from None
        # Answer from the number the customer wrote to; else from the configured number.
        via = (message.via or "").strip()
        if via.lower().startswith(_WHATSAPP):
            via = via[len(_WHATSAPP) :]
        from_ = via or self._from[message.channel]
        if not from_:
            raise PermanentFailure(f"no Twilio number is configured to send {message.channel}")
        if message.channel == "whatsapp":
            return _WHATSAPP + to, _WHATSAPP + from_
        return to, from_


def _parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        at = datetime.fromisoformat(raw.strip())
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def _rest_message(exc: TwilioRestException) -> str:
    # twilio prefixes the API's own message with its operation ("Unable to create record: ").
    text = str(exc.msg or "")
    return text.removeprefix("Unable to create record: ") or f"HTTP {exc.status}"


def _failure(status: int, code: int | None, message: str) -> Exception:
    reason = f"Twilio {code}: {message}" if code and code != status else f"Twilio: {message}"
    if status >= 500 or status == _TOO_MANY_REQUESTS:
        return TemporaryFailure(f"{reason} (HTTP {status})")
    return PermanentFailure(reason)
