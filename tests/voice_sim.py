"""A call simulator that behaves as Twilio does towards the voice webhooks, over real HTTP.

It posts signed requests (`X-Twilio-Signature` by twilio's own `RequestValidator`), parses the
TwiML answered, and follows it: `<Say>`/`<Play>`/`<Pause>` are heard (kept in `heard`),
`<Gather>` is answered from a script (keys, speech, silence = the Gather's fall-through),
`<Redirect>`, `<Enqueue>` (the waitUrl in a loop, then its action with a QueueResult),
`<Leave>`, `<Record>` (action and recording status callback), `<Dial>` (its action),
`<Hangup>`; when the call is over it posts the status callback with the call's duration.

A script is a list of caller (and queue) events, consumed in order:
  Press("1")      keys at the next <Gather>       Speak("billing")  speech at the next <Gather>
  Silence()       let the next <Gather> time out  HangUp()          the caller hangs up
  Hold()          one more wait loop in a queue   AgentAnswers(...) an agent takes the call
  LeaveMessage()  speak after the beep of <Record>
Time passes on a `FakeClock` shared with the server, so durations are exact.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"
MAX_STEPS = 200


@dataclass(frozen=True)
class Press:
    digits: str


@dataclass(frozen=True)
class Speak:
    text: str


@dataclass(frozen=True)
class Silence:
    pass


@dataclass(frozen=True)
class HangUp:
    pass


@dataclass(frozen=True)
class Hold:
    pass


@dataclass(frozen=True)
class AgentAnswers:
    agent_leg: str  # the TwiML of the agent's leg: <Dial><Queue url=...>
    talk_seconds: int = 60


@dataclass(frozen=True)
class LeaveMessage:
    seconds: int = 12


ScriptItem = Press | Speak | Silence | HangUp | Hold | AgentAnswers | LeaveMessage


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ScriptError(AssertionError):
    """The TwiML asked for something the script does not provide (or the other way round)."""


@dataclass
class Posted:
    url: str
    params: dict[str, str]
    status: int
    text: str


@dataclass
class CallResult:
    heard: list[str]
    posted: list[Posted]
    ended_by: str  # "caller" or "ivr"

    def said(self) -> str:
        return " ".join(self.heard)

    def paths(self) -> list[str]:
        return [urlsplit(p.url).path for p in self.posted]


# Outcomes of running a TwiML document
@dataclass(frozen=True)
class _Ended:
    by: str


@dataclass(frozen=True)
class _WaitAgain:
    pass


@dataclass(frozen=True)
class _Left:
    pass


@dataclass(frozen=True)
class _CallerHungUpWaiting:
    pass


_Outcome = _Ended | _WaitAgain | _Left | _CallerHungUpWaiting


@dataclass
class _Queue:
    name: str
    wait_url: str
    action: str
    entered: datetime


@dataclass
class CallSimulator:
    client: httpx.AsyncClient
    base_url: str
    token: str
    clock: FakeClock
    call_sid: str
    caller: str = "+14155550123"
    to: str = "+15005550006"
    heard: list[str] = field(default_factory=list)
    posted: list[Posted] = field(default_factory=list)
    _script: deque[ScriptItem] = field(default_factory=deque)
    _started: datetime | None = None
    _recordings: int = 0

    # --- HTTP ---------------------------------------------------------------------------------

    def _params(self, **extra: str) -> dict[str, str]:
        return {
            "AccountSid": "AC" + "0" * 32,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": "in-progress",
            "Direction": "inbound",
            "From": self.caller,
            "To": self.to,
            **extra,
        }

    async def post(self, url: str, params: dict[str, str]) -> httpx.Response:
        """One signed request, as Twilio makes it; kept in `posted`."""
        signature = RequestValidator(self.token).compute_signature(url, params)
        response = await self.client.post(url, data=params, headers={SIGNATURE_HEADER: signature})
        self.posted.append(Posted(url, params, response.status_code, response.text))
        return response

    async def repeat(self, posted: Posted) -> httpx.Response:
        """Twilio retrying a request it made before."""
        return await self.post(posted.url, posted.params)

    async def _fetch(self, url: str, **extra: str) -> ET.Element:
        response = await self.post(self._absolute(url), self._params(**extra))
        if response.status_code != 200:
            raise ScriptError(f"{url} answered {response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/xml")
        root = ET.fromstring(response.text)
        assert root.tag == "Response", response.text
        return root

    def _absolute(self, url: str) -> str:
        return url if "://" in url else self.base_url + url

    # --- the call -----------------------------------------------------------------------------

    async def call(self, script: list[ScriptItem]) -> CallResult:
        """Makes the call, follows the TwiML through the script, then reports its end."""
        self._script = deque(script)
        self._started = self.clock.now
        root = await self._fetch(self.base_url + "/twilio/voice", CallStatus="ringing")
        outcome = await self._run(root, None)
        by = outcome.by if isinstance(outcome, _Ended) else "ivr"
        if self._script:
            raise ScriptError(f"the call ended with script left: {list(self._script)}")
        duration = round((self.clock.now - self._started).total_seconds())
        await self.post(
            self.base_url + "/twilio/voice/status",
            self._params(CallStatus="completed", CallDuration=str(duration)),
        )
        return CallResult(self.heard, self.posted, by)

    def _next(self) -> ScriptItem:
        if not self._script:
            raise ScriptError(f"the script ran out; last heard: {self.heard[-2:]}")
        return self._script[0]

    def _hear(self, verb: ET.Element) -> None:
        if verb.tag == "Say":
            self.heard.append(verb.text or "")
            self.clock.advance(3)
        elif verb.tag == "Play":
            self.heard.append(f"[{verb.text}]")
            self.clock.advance(5)
        elif verb.tag == "Pause":
            self.clock.advance(int(verb.get("length", "1")))
        else:
            raise ScriptError(f"<{verb.tag}> is not allowed inside <Gather>")

    async def _run(self, root: ET.Element, queue: _Queue | None) -> _Outcome:
        document: ET.Element | None = root
        steps = 0
        while document is not None:
            steps += 1
            if steps > MAX_STEPS:
                raise ScriptError("too many steps: a loop?")
            outcome, document = await self._document(document, queue)
            if outcome is not None:
                return outcome
        raise AssertionError("unreachable")

    async def _document(
        self, document: ET.Element, queue: _Queue | None
    ) -> tuple[_Outcome | None, ET.Element | None]:
        """Runs one document: an outcome, or the next document to run."""
        for verb in document:
            tag = verb.tag
            if tag in ("Say", "Play", "Pause"):
                self._hear(verb)
            elif tag == "Gather":
                for inner in verb:
                    self._hear(inner)
                result = await self._gather(verb, queue)
                if result is not None:
                    return result
            elif tag == "Redirect":
                target = verb.text or ""
                if queue is not None and _same_step(target, queue.wait_url):
                    return _WaitAgain(), None
                return None, await self._fetch(target)
            elif tag == "Enqueue":
                if queue is not None:
                    raise ScriptError("<Enqueue> while already queued")
                return await self._enqueue(verb)
            elif tag == "Leave":
                if queue is not None:
                    return _Left(), None
            elif tag == "Record":
                result = await self._record(verb, queue)
                if result is not None:
                    return result
            elif tag == "Dial":
                if queue is not None:
                    raise ScriptError("<Dial> is not allowed while queued")
                self.clock.advance(30)
                return None, await self._fetch(
                    verb.get("action") or "",
                    DialCallStatus="completed",
                    DialCallDuration="30",
                )
            elif tag == "Hangup":
                return _Ended("ivr"), None
            else:
                raise ScriptError(f"unexpected <{tag}>")
        return (_WaitAgain() if queue is not None else _Ended("ivr")), None

    async def _gather(
        self, verb: ET.Element, queue: _Queue | None
    ) -> tuple[_Outcome | None, ET.Element | None] | None:
        """The script's answer to a <Gather>; None to fall through (a time-out)."""
        inputs = (verb.get("input") or "dtmf").split()
        item = self._next()
        if isinstance(item, HangUp):
            self._script.popleft()
            return (_CallerHungUpWaiting() if queue is not None else _Ended("caller")), None
        if isinstance(item, Press) and "dtmf" in inputs:
            self._script.popleft()
            self.clock.advance(2)
            return None, await self._fetch(verb.get("action") or "", Digits=item.digits)
        if isinstance(item, Speak) and "speech" in inputs:
            self._script.popleft()
            self.clock.advance(2)
            language = verb.get("language") or "en-US"
            return None, await self._fetch(
                verb.get("action") or "",
                SpeechResult=item.text,
                Confidence="0.91",
                Language=language,
            )
        if isinstance(item, Silence):
            self._script.popleft()
        self.clock.advance(int(verb.get("timeout", "5")))
        return None

    async def _record(
        self, verb: ET.Element, queue: _Queue | None
    ) -> tuple[_Outcome | None, ET.Element | None] | None:
        if queue is not None:
            raise ScriptError("<Record> is not allowed while queued")
        item = self._next()
        if not isinstance(item, LeaveMessage):
            return None  # nothing said: Twilio goes on past <Record>
        self._script.popleft()
        self.clock.advance(item.seconds)
        self._recordings += 1
        sid = "RE" + f"{self._recordings:02d}" + self.call_sid[4:]
        recording = {
            "RecordingSid": sid,
            "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/AC0/Recordings/{sid}",
            "RecordingDuration": str(item.seconds),
        }
        callback = verb.get("recordingStatusCallback")
        if callback:
            await self._fetch(callback, RecordingStatus="completed", **recording)
        return None, await self._fetch(verb.get("action") or "", **recording)

    async def _enqueue(self, verb: ET.Element) -> tuple[_Outcome | None, ET.Element | None]:
        queue = _Queue(
            name=verb.text or "",
            wait_url=verb.get("waitUrl") or "",
            action=verb.get("action") or "",
            entered=self.clock.now,
        )
        position = 3
        for _ in range(MAX_STEPS):
            waited = str(round((self.clock.now - queue.entered).total_seconds()))
            wait_doc = await self._fetch(
                queue.wait_url,
                QueueSid="QU" + "0" * 32,
                QueuePosition=str(position),
                QueueTime=waited,
                AvgQueueTime="60",
                CurrentQueueSize=str(position + 1),
            )
            outcome = await self._run(wait_doc, queue)
            waited = str(round((self.clock.now - queue.entered).total_seconds()))
            if isinstance(outcome, _Left):
                return None, await self._fetch(queue.action, QueueResult="leave", QueueTime=waited)
            if isinstance(outcome, _CallerHungUpWaiting):
                await self._fetch(
                    queue.action, QueueResult="hangup", QueueTime=waited, CallStatus="completed"
                )
                return _Ended("caller"), None
            if isinstance(outcome, _Ended):
                return outcome, None
            item = self._next()
            if isinstance(item, HangUp):
                self._script.popleft()
                await self._fetch(
                    queue.action, QueueResult="hangup", QueueTime=waited, CallStatus="completed"
                )
                return _Ended("caller"), None
            if isinstance(item, AgentAnswers):
                self._script.popleft()
                await self._answer(queue, item, waited)
                self.clock.advance(item.talk_seconds)
                return None, await self._fetch(
                    queue.action, QueueResult="bridged", QueueTime=waited
                )
            if isinstance(item, Hold):
                self._script.popleft()
            position = max(1, position - 1)
        raise ScriptError("the queue never ended")

    async def _answer(self, queue: _Queue, item: AgentAnswers, waited: str) -> None:
        """The agent's leg dequeues the caller: Twilio fetches its <Queue url> for the caller."""
        leg = ET.fromstring(item.agent_leg)
        noun = leg.find("./Dial/Queue")
        if noun is None or noun.text != queue.name:
            raise ScriptError(f"the agent leg does not take queue {queue.name!r}")
        url = noun.get("url")
        if url:
            await self._fetch(
                url, QueueSid="QU" + "0" * 32, QueueTime=waited, DequeingCallSid="CA" + "f" * 32
            )


def _same_step(a: str, b: str) -> bool:
    return urlsplit(a)[:3] == urlsplit(b)[:3] and urlsplit(a).query == urlsplit(b).query
