"""Twilio's Calls API, as the callback dialer and the call connector need it: a small port
(`TwilioCalls`) and its implementation with twilio's own REST client on its asyncio transport
(`TwilioRestCalls`), pointed at `TWILIO_API_BASE` when one is given (tests run a stand-in).

Errors come out as `TemporaryFailure` (Twilio unreachable, 5xx, 429, 401 wrong credentials:
try again later; for a create, Twilio may or may not have placed the call) or
`PermanentFailure` (other 4xx: the request itself is wrong, retrying changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any, Protocol

import aiohttp
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.twiml.voice_response import Dial, VoiceResponse

from adapters.twilio_out import RestClient

# A call's status once it will not change any more.
TERMINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
_TOO_MANY_REQUESTS = 429
_UNAUTHORIZED = 401
_ERRORS = (TwilioRestException, TwilioServiceException, aiohttp.ClientError, OSError, TimeoutError)


class TwilioCallsError(Exception):
    """A Calls API request that did not succeed."""


class TemporaryFailure(TwilioCallsError):
    """Try again later; after a create, whether the call exists is unknown."""


class PermanentFailure(TwilioCallsError):
    """The request is refused as it stands (a bad number, an unknown call)."""


@dataclass(frozen=True)
class CallStatus:
    """What Twilio says of one call. `answered_by` is `human`, `machine_start`, ... or
    `unknown` with answering-machine detection on, None without it. `sid`, `from_`, `to` and
    `created_at` are filled in by `list_calls` (and by `fetch_call` where Twilio gives them);
    `started_at` and `ended_at` are Twilio's `start_time` and `end_time` when it has them
    (`duration` runs from the answer to `ended_at`)."""

    status: str
    answered_by: str | None = None
    duration: float | None = None
    sid: str | None = None
    from_: str | None = None
    to: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class TwilioCalls(Protocol):
    async def create_call(self, to: str, from_: str, twiml: str) -> str:
        """Places a call that runs `twiml` once answered; returns its CallSid."""
        ...

    async def update_call(self, sid: str, twiml: str) -> None:
        """Makes a live call run `twiml` from now on (what it was doing stops)."""
        ...

    async def fetch_call(self, sid: str) -> CallStatus: ...

    async def list_calls(self, to: str, started_after: datetime) -> list[CallStatus]:
        """Calls to `to` created at or after `started_after`, newest first."""
        ...


def dial_twiml(voice_to: str, *, say: str | None = None) -> str:
    """`<Response>[<Say>say</Say>]<Dial>voice_to</Dial></Response>`: a number as text, a
    Twilio Client (`client:NAME`) as `<Client>`, a SIP address as `<Sip>`."""
    response = VoiceResponse()
    if say:
        response.say(say)
    dial = Dial()
    if voice_to.startswith("client:"):
        dial.client(voice_to.removeprefix("client:"))
    elif voice_to.startswith("sip:"):
        dial.sip(voice_to)
    else:
        dial.number(voice_to)
    response.append(dial)
    return str(response)


class TwilioRestCalls:
    """`TwilioCalls` over Twilio's REST API. Call `close()` at shutdown.

    Calls are placed with answering-machine detection (`machine_detection`), so that
    `answered_by` tells a person from a voicemail; `ring_seconds` is how long the phone rings
    before Twilio gives up with `no-answer`."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base: str | None = None,
        *,
        machine_detection: str | None = "Enable",
        ring_seconds: int = 30,
        timeout: float = 15.0,
    ) -> None:
        self._rest = RestClient(account_sid, auth_token, api_base, timeout=timeout)
        self._machine_detection = machine_detection
        self._ring_seconds = ring_seconds

    async def close(self) -> None:
        await self._rest.close()

    async def create_call(self, to: str, from_: str, twiml: str) -> str:
        extra: dict[str, Any] = {"timeout": self._ring_seconds}
        if self._machine_detection:
            extra["machine_detection"] = self._machine_detection
        try:
            call = await self._rest().calls.create_async(to=to, from_=from_, twiml=twiml, **extra)
        except ValueError as exc:  # a 2xx answer that is not JSON: the call may exist
            raise TemporaryFailure(f"Twilio's answer was not JSON: {exc}") from exc
        except _ERRORS as exc:
            raise _failure(exc) from exc
        sid = getattr(call, "sid", None)
        if not isinstance(sid, str) or not sid:
            raise TemporaryFailure("Twilio accepted the call but returned no CallSid")
        return sid

    async def update_call(self, sid: str, twiml: str) -> None:
        try:
            await self._rest().calls(sid).update_async(twiml=twiml)
        except _ERRORS as exc:
            raise _failure(exc) from exc

    async def fetch_call(self, sid: str) -> CallStatus:
        try:
            call = await self._rest().calls(sid).fetch_async()
        except _ERRORS as exc:
            raise _failure(exc) from exc
        return _status(call)

    async def list_calls(self, to: str, started_after: datetime) -> list[CallStatus]:
        # Twilio filters StartTime by whole UTC days: ask for the day, then keep the calls
        # created from `started_after` on (a call still queued has no start time yet, but
        # always a creation time).
        day = datetime.combine(started_after.astimezone(UTC).date(), time(), UTC)
        try:
            calls = await self._rest().calls.list_async(to=to, start_time_after=day, limit=100)
        except _ERRORS as exc:
            raise _failure(exc) from exc
        found = [_status(call) for call in calls]
        since = started_after.replace(microsecond=0)  # Twilio's times are whole seconds
        return [c for c in found if c.created_at is None or c.created_at >= since]


def _status(call: Any) -> CallStatus:
    duration = getattr(call, "duration", None)
    created = getattr(call, "date_created", None)
    started = getattr(call, "start_time", None)
    ended = getattr(call, "end_time", None)
    return CallStatus(
        status=str(getattr(call, "status", "") or "unknown"),
        answered_by=getattr(call, "answered_by", None) or None,
        duration=float(duration) if duration not in (None, "") else None,
        sid=getattr(call, "sid", None),
        from_=getattr(call, "_from", None),  # twilio names the attribute so
        to=getattr(call, "to", None),
        created_at=created if isinstance(created, datetime) else None,
        started_at=started if isinstance(started, datetime) else None,
        ended_at=ended if isinstance(ended, datetime) else None,
    )


def _failure(exc: BaseException) -> TwilioCallsError:
    """Twilio's exceptions and transport errors as ours."""
    if isinstance(exc, TwilioRestException):
        return _by_status(exc.status, exc.code, str(exc.msg or ""))
    if isinstance(exc, TwilioServiceException):
        return _by_status(exc.status, exc.code, str(exc.detail or exc.title))
    return TemporaryFailure(f"Twilio unreachable: {exc!r}")


def _by_status(status: int, code: int | None, message: str) -> TwilioCallsError:
    reason = f"Twilio {code}: {message}" if code and code != status else f"Twilio: {message}"
    # wrong credentials are the account's problem, not the call's: fixed, it goes through
    if status >= 500 or status in (_TOO_MANY_REQUESTS, _UNAUTHORIZED):
        return TemporaryFailure(f"{reason} (HTTP {status})")
    return PermanentFailure(f"{reason} (HTTP {status})")


__all__ = [
    "TERMINAL_STATUSES",
    "CallStatus",
    "PermanentFailure",
    "TemporaryFailure",
    "TwilioCalls",
    "TwilioCallsError",
    "TwilioRestCalls",
    "dial_twiml",
]
