"""The voice call flow: one Twilio webhook request in, the TwiML answer and the contact events to
publish out. Pure: no I/O; the time, the caller's queue numbers and what this process knows of
the call are passed in.

Where a call stands lives in the URLs we hand Twilio (`node`, `attempt`, `lang`, `path`, ...),
so any process can answer the next step. `path` is the list of choices taken (option digits,
`o<i>` for a speech-only option, `d` for a node's default, `h` for a business-hours branch,
`r` for a restart), joined by dots; event ids are built from the CallSid and the path, so
Twilio retrying a request yields the same events (the ingest drops the duplicates) and the same
TwiML. A step we cannot place (a missing or unknown node, an unknown URL) starts the menu again.

Steps (all POST, under /twilio/voice):
  ``                  incoming call: `call.started`, then the start node
  `/gather`           a menu's key or speech, or no input (the <Redirect> after the <Gather>)
  `/wait`             <Enqueue waitUrl>: position, honest estimate, "press star for a callback"
  `/wait/key`         a key pressed while waiting
  `/queue-result`     <Enqueue action>: hung up while queued → `call.abandoned`; left → ...
  `/answered`         <Queue url> of the agent's leg, just before bridging → `call.answered`
  `/callback`, `/callback/number`, `/callback/confirm`: the caller's number for a callback
  `/voicemail`        <Record action>; `/recording` its status callback (same event)
  `/dial-result`      the end of a transfer
  `/status`           the call's status callback → `call.ended` or `call.abandoned`
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import phonenumbers

from inbox.contact import ContactEvent, CustomerRef, EventType, ThreadRef
from inbox.identity import InvalidIdentity, normalise_phone
from ivr.menu import (
    Action,
    ChooseLanguage,
    Enqueue,
    GoTo,
    HangUp,
    HoursBranch,
    Menu,
    Node,
    OfferCallback,
    Option,
    Transfer,
    Voicemail,
    action_name,
    normalise_speech,
)
from ivr.twiml import EMPTY, Twiml

VOICE_PATH = "/twilio/voice"
GATHER_PATH = VOICE_PATH + "/gather"
WAIT_PATH = VOICE_PATH + "/wait"
WAIT_KEY_PATH = VOICE_PATH + "/wait/key"
QUEUE_RESULT_PATH = VOICE_PATH + "/queue-result"
ANSWERED_PATH = VOICE_PATH + "/answered"
CALLBACK_PATH = VOICE_PATH + "/callback"
CALLBACK_NUMBER_PATH = CALLBACK_PATH + "/number"
CALLBACK_CONFIRM_PATH = CALLBACK_PATH + "/confirm"
VOICEMAIL_PATH = VOICE_PATH + "/voicemail"
RECORDING_PATH = VOICE_PATH + "/recording"
DIAL_RESULT_PATH = VOICE_PATH + "/dial-result"
STATUS_PATH = VOICE_PATH + "/status"

CALLBACK_KEYS = frozenset("*9")
# An invalid callback number is asked for again this many times, then the call goes to voicemail.
CALLBACK_RETRIES = 2
# Nodes passed through without input in one answer (the checker refuses such loops; this
# guards a menu changed under a running call).
MAX_CHAIN = 16
# Choices in one call: beyond this the URL grows too long for Twilio; the call is ended.
MAX_PATH_STEPS = 60
WAIT_PAUSE_SECONDS = 20
_CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}\Z")
_PATH = re.compile(r"^[0-9a-z*#]{1,4}(\.[0-9a-z*#]{1,4})*\Z")
_RECORDING_SID = re.compile(r"^RE[0-9a-fA-F]{32}\Z")
# Twilio's stand-ins for a withheld caller id.
_ANONYMOUS = frozenset({"+266696687", "+7378742833", "+2562533", "+86282452253", "+8656696"})
_FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "canceled", "failed"})
_VOICEMAIL_RESULTS = frozenset({"queue-full", "error", "system-error"})


class MalformedVoiceRequest(ValueError):
    """A signed request that is not a call step Twilio would send (no CallSid): answered 400."""


@dataclass(frozen=True)
class QueueInfo:
    """The caller's place in the router's queue, from ivr.estimate; None: not known."""

    position: int | None
    estimate_seconds: float | None
    agents_available: int


@dataclass(frozen=True)
class CallRecord:
    """What the process answering the steps learnt of a call, for its status callback (which
    Twilio posts to a fixed URL, so without our query string)."""

    started_at: datetime | None = None
    language: str | None = None
    queue: str | None = None
    queued_at: datetime | None = None
    answered_at: datetime | None = None
    agent: str | None = None
    # how the call left the IVR or queue: callback, voicemail, transfer, hangup, abandoned
    outcome: str | None = None
    queue_seconds: float | None = None
    # from the answer to the end of the bridge (the queue result), when this process saw both
    talk_seconds: int | None = None


@dataclass(frozen=True)
class VoiceRequest:
    path: str
    query: Mapping[str, str]
    form: Mapping[str, str]
    call_sid: str
    caller: str | None  # the caller's E.164 number; None when withheld or not a phone
    customer: CustomerRef

    def field(self, name: str) -> str:
        return self.form.get(name, "").strip()

    def param(self, name: str) -> str:
        return self.query.get(name, "").strip()


@dataclass(frozen=True)
class Step:
    twiml: str
    events: tuple[ContactEvent, ...] = ()
    # The call's record after this step, when it changed.
    record: CallRecord | None = None


def parse_request(path: str, query: Mapping[str, str], form: Mapping[str, str]) -> VoiceRequest:
    """The step's request; MalformedVoiceRequest when it carries no usable CallSid."""
    sid = form.get("CallSid", "").strip()
    if not _CALL_SID.match(sid):
        raise MalformedVoiceRequest(f"CallSid {sid[:40]!r} is not a Twilio call SID")
    caller = _caller(form.get("From", ""))
    customer = CustomerRef(phone=caller) if caller else CustomerRef(visitor=f"call-{sid}")
    return VoiceRequest(path.rstrip("/") or VOICE_PATH, query, form, sid, caller, customer)


def _caller(raw: str) -> str | None:
    text = raw.strip()
    if not text or text in _ANONYMOUS or ":" in text:  # client:alice, sip:...
        return None
    try:
        return normalise_phone(text)
    except InvalidIdentity:
        return None


def handle(
    menu: Menu,
    request: VoiceRequest,
    *,
    base_url: str,
    now: datetime,
    record: CallRecord | None = None,
    queue_info: QueueInfo | None = None,
) -> Step:
    """The answer to one step of a call."""
    return _Call(menu, request, base_url.rstrip("/"), now, record, queue_info).answer()


def url(base_url: str, step: str, /, **params: str | int | None) -> str:
    kept = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    return base_url + step + ("?" + urlencode(kept) if kept else "")


def answered_url(base_url: str, queue: str, agent: str) -> str:
    """The `<Queue url>` for an agent's leg (see ivr.twiml.agent_leg)."""
    return url(base_url.rstrip("/"), ANSWERED_PATH, queue=queue, agent=agent)


def spoken_number(number: str, home: str | None = None) -> str:
    """A number read back digit by digit: nationally when it is in the caller's country."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return " ".join(number)
    same_country = home is not None and _region(home) == _region(number)
    style = (
        phonenumbers.PhoneNumberFormat.NATIONAL
        if same_country
        else phonenumbers.PhoneNumberFormat.INTERNATIONAL
    )
    text = phonenumbers.format_number(parsed, style)
    return ", ".join(c for c in text if c.isdigit() or c == "+")


def keyed_number(digits: str, region: str) -> str | None:
    """Digits keyed in by a caller as an E.164 number (national in `region`, or with the
    region's international prefix), None when it cannot be a phone number there."""
    if not digits.isdigit() or not 3 <= len(digits) <= 20:
        return None
    try:
        number = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _region(number: str) -> str | None:
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return None


@dataclass
class _Call:
    menu: Menu
    request: VoiceRequest
    base_url: str
    now: datetime
    record: CallRecord | None
    queue_info: QueueInfo | None
    twiml: Twiml = field(default_factory=Twiml)
    events: list[ContactEvent] = field(default_factory=list)
    new_record: CallRecord | None = None
    lang: str = ""
    depth: int = 0

    def __post_init__(self) -> None:
        lang = self.request.param("lang")
        self.lang = lang if lang in self.menu.languages else self.menu.default_language

    # --- plumbing -------------------------------------------------------------------------

    def answer(self) -> Step:
        handler = _HANDLERS.get(self.request.path, _Call.restart)
        twiml = handler(self)
        return Step(twiml or str(self.twiml), tuple(self.events), self.new_record)

    @property
    def sid(self) -> str:
        return self.request.call_sid

    def event(self, kind: EventType, suffix: str, **payload: Any) -> None:
        self.events.append(
            ContactEvent(
                event_id=f"{self.sid}:{suffix}",
                occurred_at=self.now,
                channel="voice",
                type=kind,
                customer=self.request.customer,
                thread=ThreadRef(ref=self.sid),
                payload={"call_sid": self.sid, **payload},
            )
        )

    def remember(self, **changes: Any) -> None:
        current = self.new_record or self.record or CallRecord()
        self.new_record = replace(current, **changes)

    def url(self, step: str, /, **params: str | int | None) -> str:
        return url(self.base_url, step, lang=self.lang, **params)

    def say(self, key: str, **values: object) -> None:
        self.twiml.say(self.menu.phrase(self.lang, key, **values), self.menu.voice(self.lang))

    @property
    def path(self) -> str:
        raw = self.request.param("path")
        return raw if _PATH.match(raw) else ""

    def queue_param(self) -> str:
        queue = self.request.param("queue")
        return queue[:100] if queue else "default"

    def in_queue(self) -> bool:
        return self.request.param("inq") == "1"

    # --- the menu -------------------------------------------------------------------------

    def incoming(self) -> None:
        self.event("call.started", "started", to=self.request.field("To") or None)
        if self.record is None or self.record.started_at is None:
            self.remember(started_at=self.now, language=self.lang)
        self.enter(self.menu.start, "")

    def restart(self) -> None:
        """A step we cannot place: record it once (its id comes from the request) and start
        the menu again; `r` in the path keeps later choices' event ids new."""
        raw_node = self.request.param("node")[:64]
        path = _extend(self.path, "r")
        self.event(
            "ivr.selected",
            f"ivr:{path}",
            node=raw_node or None,
            choice="restart",
            path=path,
            action="restart",
            language=self.lang,
        )
        self.enter(self.menu.start, path)

    def gather(self) -> None:
        node = self.menu.nodes.get(self.request.param("node"))
        if node is None:
            self.restart()
            return
        if not node.is_menu:
            self.enter(node.name, self.path)
            return
        attempt = _int(self.request.param("attempt"), 0, 99)
        option = self.match(node)
        if option is not None:
            self.select(node, option.action, option.token, self.path)
        elif attempt < node.repeats:
            self.menu_prompt(node, self.path, attempt + 1, invalid=True)
        else:
            assert node.default is not None  # the checker requires it of menu nodes
            self.select(node, node.default, "d", self.path)

    def match(self, node: Node) -> Option | None:
        digits = self.request.field("Digits")
        if digits:
            return next((o for o in node.options if o.digit == digits), None)
        said = normalise_speech(self.request.field("SpeechResult")[:500])
        if not said:
            return None
        padded = f" {said} "
        languages = tuple(self.menu.languages) if node.multilingual else (self.lang,)
        for option in node.options:
            if option.digit is not None and said == option.digit:
                return option
            for language in languages:
                if any(f" {word} " in padded for word in option.keywords.get(language, ())):
                    return option
        return None

    def enter(self, name: str, path: str) -> None:
        """Goes to a node: a menu node asks; an action node says its prompt and acts."""
        self.depth += 1
        node = self.menu.nodes.get(name)
        if node is None or self.depth > MAX_CHAIN:
            self.say("unavailable")
            self.twiml.hangup()
            return
        if node.action is None:
            self.menu_prompt(node, path, 0, invalid=False)
            return
        self.prompt(node)
        self.perform(node, node.action, path)

    def prompt(self, node: Node) -> None:
        languages = tuple(self.menu.languages) if node.multilingual else (self.lang,)
        for language in languages:
            prompt = node.prompt.get(language)
            if prompt is not None:
                self.twiml.prompt(prompt, self.menu.voice(language))

    def menu_prompt(self, node: Node, path: str, attempt: int, *, invalid: bool) -> None:
        here = self.url(GATHER_PATH, node=node.name, attempt=attempt, path=path)
        languages = tuple(self.menu.languages) if node.multilingual else (self.lang,)
        hints = [w for o in node.options for lang in languages for w in o.speech.get(lang, ())]
        self.twiml.gather(
            here,
            timeout=node.timeout,
            speech=True,
            language=self.menu.voice(self.lang).locale,
            hints=hints,
        )
        if invalid:
            self.say("invalid")
        self.prompt(node)
        # No input: Twilio goes on past the <Gather>; the same URL without Digits.
        self.twiml.redirect(here)

    def select(self, node: Node, action: Action, token: str, path: str) -> None:
        """The caller's choice (or the node's default): `ivr.selected`, then the action."""
        path = _extend(path, token)
        if path.count(".") >= MAX_PATH_STEPS:
            self.say("goodbye")
            self.twiml.hangup()
            return
        if isinstance(action, ChooseLanguage):
            self.lang = action.language
        self.event(
            "ivr.selected",
            f"ivr:{path}",
            node=node.name,
            choice="default" if token == "d" else token,
            path=path,
            action=action_name(action),
            language=self.lang,
            **self.said(),
        )
        self.perform(node, action, path)

    def said(self) -> dict[str, str]:
        speech = self.request.field("SpeechResult")
        if self.request.field("Digits") or not speech:
            return {}
        return {"speech": speech[:500]}

    def hours_branch(self, node: Node, branch: HoursBranch, path: str) -> None:
        path = _extend(path, "h")
        is_open = self.menu.hours[branch.hours].is_open(self.now)
        # The id leaves the outcome out: a retry across the opening time is still one event.
        self.event(
            "ivr.selected",
            f"ivr:{path}",
            node=node.name,
            choice="open" if is_open else "closed",
            path=path,
            action="hours",
            language=self.lang,
        )
        self.enter(branch.open if is_open else branch.closed, path)

    def perform(self, node: Node, action: Action, path: str) -> None:
        match action:
            case GoTo(node=target):
                self.enter(target, path)
            case ChooseLanguage(language=language, node=target):
                self.lang = language
                self.enter(target, path)
            case HoursBranch():
                self.hours_branch(node, action, path)
            case Enqueue():
                self.enqueue(action, path)
            case OfferCallback(queue=queue):
                self.callback_prompt(queue, path, tries=0, in_queue=False, invalid=False)
            case Voicemail(queue=queue):
                self.voicemail(queue, path)
            case Transfer(number=number):
                self.remember(outcome="transfer")
                self.say("transfer")
                self.twiml.dial(number, action=self.url(DIAL_RESULT_PATH, path=path))
            case HangUp():
                self.remember(outcome="hangup")
                self.say("goodbye")
                self.twiml.hangup()

    # --- the queue ------------------------------------------------------------------------

    def enqueue(self, action: Enqueue, path: str) -> None:
        self.event(
            "call.queued",
            f"queued:{path}",
            queue=action.queue,
            priority=action.priority,
            skill=action.skill,
            language=self.lang,
        )
        self.remember(queue=action.queue, queued_at=self.now, language=self.lang)
        self.say("hold")
        self.twiml.enqueue(
            action.queue,
            wait_url=self.url(WAIT_PATH, queue=action.queue, path=path),
            action=self.url(QUEUE_RESULT_PATH, queue=action.queue, path=path),
        )

    def wait(self) -> None:
        queue, path = self.queue_param(), self.path
        info = self.queue_info or QueueInfo(None, None, 0)
        position = info.position or _int(self.request.field("QueuePosition"), 0, 100_000) or None
        self.twiml.gather(
            self.url(WAIT_KEY_PATH, queue=queue, path=path),
            timeout=1,
            speech=False,
            language=self.menu.voice(self.lang).locale,
        )
        if position is not None:
            self.say("position", position=position)
        self.say_estimate(info)
        self.say("callback_key")
        if self.menu.hold_music:
            self.twiml.play(self.menu.hold_music)
        else:
            self.twiml.pause(WAIT_PAUSE_SECONDS)
        self.twiml.redirect(self.url(WAIT_PATH, queue=queue, path=path))

    def say_estimate(self, info: QueueInfo) -> None:
        seconds = info.estimate_seconds
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            if info.agents_available <= 0:
                self.say("no_agents")
            self.say("wait_unknown")
        elif seconds < 60:
            self.say("wait_under_minute")
        elif seconds == 60:
            self.say("wait_one_minute")
        else:
            # Rounded up: an estimate that errs on the long side is the honest one.
            self.say("wait_minutes", minutes=math.ceil(seconds / 60))

    def wait_key(self) -> None:
        queue, path = self.queue_param(), self.path
        if self.request.field("Digits") in CALLBACK_KEYS:
            self.callback_prompt(queue, path, tries=0, in_queue=True, invalid=False)
        else:
            self.twiml.redirect(self.url(WAIT_PATH, queue=queue, path=path))

    def queue_result(self) -> str | None:
        result = self.request.field("QueueResult").lower()
        queue = self.queue_param()
        seconds = _int(self.request.field("QueueTime"), 0, 10**7)
        outcome = self.record.outcome if self.record else None
        if result == "hangup" and outcome != "callback":
            self.event("call.abandoned", "abandoned", queue=queue, queue_seconds=seconds)
            self.remember(outcome="abandoned", queue=queue, queue_seconds=seconds)
            return EMPTY
        if result == "leave":
            if outcome == "callback":
                self.twiml.hangup()  # the confirmation was said before <Leave>
            else:
                self.voicemail(queue, self.path)
            return None
        if result == "bridged":
            self.answered(queue, agent=None, seconds=seconds)
            answered_at = (self.new_record or self.record or CallRecord()).answered_at
            if answered_at is not None:
                self.remember(talk_seconds=_seconds(answered_at, self.now))
            self.say("goodbye")
            self.twiml.hangup()
            return None
        if result in _VOICEMAIL_RESULTS:
            self.voicemail(queue, self.path)
            return None
        # Taken out of the queue by the call connector (REST redirect to the agent's <Dial>),
        # which publishes call.answered itself: remember it as answered now, so the status
        # callback reports talk time and no abandon.
        if result.startswith("redirected") and (self.record is None or not self.record.answered_at):
            self.remember(queue=queue, answered_at=self.now)
        return EMPTY

    def answered_step(self) -> str:
        seconds = _int(self.request.field("QueueTime"), 0, 10**7)
        self.answered(self.queue_param(), self.request.param("agent")[:200] or None, seconds)
        return EMPTY

    def answered(self, queue: str, agent: str | None, seconds: int) -> None:
        payload: dict[str, Any] = {"queue": queue, "queue_seconds": seconds}
        if agent is not None:
            payload["agent"] = agent
        # One id for both reports (the agent leg's <Queue url> and the bridged queue result).
        self.event("call.answered", "answered", **payload)
        if self.record is None or self.record.answered_at is None:
            answered_at = self.now
            if agent is None and self.record is not None and self.record.queued_at is not None:
                # reported after the talk: the answer came QueueTime after queueing
                answered_at = _plus(self.record.queued_at, seconds)
            self.remember(queue=queue, answered_at=answered_at, agent=agent)

    # --- callbacks ------------------------------------------------------------------------

    def callback(self) -> None:
        self.callback_prompt(
            self.queue_param(),
            self.path,
            tries=_int(self.request.param("tries"), 0, 9),
            in_queue=self.in_queue(),
            invalid=False,
        )

    def callback_prompt(
        self, queue: str, path: str, *, tries: int, in_queue: bool, invalid: bool
    ) -> None:
        here = self.url(
            CALLBACK_NUMBER_PATH, queue=queue, path=path, inq=int(in_queue), tries=tries
        )
        self.twiml.gather(
            here,
            timeout=8,
            speech=False,
            language=self.menu.voice(self.lang).locale,
            num_digits=None,
            finish_on_key="#",
        )
        if invalid:
            self.say("callback_invalid")
        caller = self.request.caller
        if caller is not None and tries == 0:
            self.say("callback_caller_id", number=spoken_number(caller, caller))
        else:
            self.say("callback_enter")
        self.twiml.redirect(here)

    def callback_number(self) -> None:
        queue, path, in_queue = self.queue_param(), self.path, self.in_queue()
        tries = _int(self.request.param("tries"), 0, 9)
        # Only the digits: a finishing # or a stray * is no part of the number.
        digits = "".join(c for c in self.request.field("Digits") if c in "0123456789")
        caller = self.request.caller
        if digits == "1" and caller is not None and tries == 0:
            self.callback_confirmed(queue, caller, in_queue)
            return
        number = keyed_number(digits, self.home_region())
        if number is None:
            self.callback_retry(queue, path, tries, in_queue)
            return
        here = self.url(
            CALLBACK_CONFIRM_PATH,
            queue=queue,
            path=path,
            inq=int(in_queue),
            tries=tries,
            number=number,
        )
        self.twiml.gather(here, timeout=6, speech=False, language=self.menu.voice(self.lang).locale)
        self.say("callback_readback", number=spoken_number(number, caller))
        self.twiml.redirect(here)

    def callback_confirm(self) -> None:
        queue, path, in_queue = self.queue_param(), self.path, self.in_queue()
        tries = _int(self.request.param("tries"), 0, 9)
        number = _caller(self.request.param("number"))
        if self.request.field("Digits") == "1" and number is not None:
            self.callback_confirmed(queue, number, in_queue)
        else:
            self.callback_retry(queue, path, tries, in_queue)

    def callback_retry(self, queue: str, path: str, tries: int, in_queue: bool) -> None:
        if tries >= CALLBACK_RETRIES:
            self.say("callback_invalid")
            if in_queue:
                # <Record> is not allowed while queued: leave, and the queue result records.
                self.remember(outcome="voicemail")
                self.twiml.leave()
            else:
                self.voicemail(queue, path)
            return
        self.callback_prompt(queue, path, tries=tries + 1, in_queue=in_queue, invalid=True)

    def callback_confirmed(self, queue: str, number: str, in_queue: bool) -> None:
        self.event(
            "callback.requested",
            "callback",
            queue=queue,
            number=number,
            language=self.lang,
            in_queue=in_queue,
        )
        self.remember(outcome="callback")
        self.say("callback_confirmed", number=spoken_number(number, self.request.caller))
        if in_queue:
            self.twiml.leave()
        else:
            self.twiml.hangup()

    def home_region(self) -> str:
        """Where keyed-in national numbers belong: the caller's country, else ours."""
        for number in (self.request.caller, _caller(self.request.field("To"))):
            region = _region(number) if number else None
            if region and region != "ZZ":
                return region
        return "US"

    # --- voicemail, transfer, status ------------------------------------------------------

    def voicemail(self, queue: str, path: str) -> None:
        self.remember(outcome="voicemail")
        self.say("voicemail")
        self.twiml.record(
            action=self.url(VOICEMAIL_PATH, queue=queue, path=path),
            status_callback=self.url(RECORDING_PATH, queue=queue),
            max_seconds=self.menu.voicemail_seconds,
        )
        # Nothing recorded: Twilio goes on past <Record>.
        self.say("goodbye")
        self.twiml.hangup()

    def recorded(self) -> None:
        self.voicemail_event()
        self.say("voicemail_thanks")
        self.twiml.hangup()

    def recording_status(self) -> str:
        if self.request.field("RecordingStatus").lower() in ("", "completed"):
            self.voicemail_event()
        return EMPTY

    def voicemail_event(self) -> None:
        """The recording as a message (the <Record> action and the recording status callback
        report it; whichever comes first is the event, the other a duplicate)."""
        recording_url = self.request.field("RecordingUrl")
        recording_sid = self.request.field("RecordingSid")
        if not recording_url.startswith(("https://", "http://")) or not _RECORDING_SID.match(
            recording_sid
        ):
            return
        self.event(
            "message.received",
            f"voicemail:{recording_sid}",
            text="(voicemail)",
            attachments=[
                {"name": "voicemail", "type": "audio/wav", "size": 0, "ref": recording_url}
            ],
            message_id=recording_sid,
            queue=self.queue_param(),
            duration_seconds=_int(self.request.field("RecordingDuration"), 0, 10**6),
            language=self.lang,
        )

    def dial_result(self) -> None:
        self.twiml.hangup()

    def status(self) -> str:
        status = self.request.field("CallStatus").lower()
        if status not in _FINAL_STATUSES:
            return EMPTY
        duration = _int(self.request.field("CallDuration"), 0, 10**7)
        record = self.record
        if record is None:
            self.event("call.ended", "ended", ended_in="unknown", duration_seconds=duration)
        elif record.answered_at is not None:
            self.event("call.ended", "ended", **self.talk(record, duration))
        elif record.outcome == "abandoned" or (record.queued_at and record.outcome is None):
            seconds = record.queue_seconds
            if seconds is None:
                seconds = max(0, duration - _seconds(record.started_at, record.queued_at))
            self.event("call.abandoned", "abandoned", queue=record.queue, queue_seconds=seconds)
        else:
            # Never queued (or left the queue for a callback or voicemail): not an abandon.
            ended_in = record.outcome or "ivr"
            self.event("call.ended", "ended", ended_in=ended_in, duration_seconds=duration)
        return EMPTY

    def talk(self, record: CallRecord, duration: int) -> dict[str, Any]:
        assert record.answered_at is not None
        talk = record.talk_seconds
        if talk is None:  # still talking when the call ended, or the bridge end not seen
            talk = max(0, duration - _seconds(record.started_at, record.answered_at))
        return {
            "ended_in": "agent",
            "queue": record.queue,
            "agent": record.agent,
            "talk_seconds": talk,
            # Holds by the agent are not visible in the caller's webhooks.
            "hold_seconds": 0,
            "wrap_seconds": 0,
            "duration_seconds": duration,
        }


_HANDLERS: Mapping[str, Callable[[_Call], str | None]] = {
    VOICE_PATH: _Call.incoming,
    GATHER_PATH: _Call.gather,
    WAIT_PATH: _Call.wait,
    WAIT_KEY_PATH: _Call.wait_key,
    QUEUE_RESULT_PATH: _Call.queue_result,
    ANSWERED_PATH: _Call.answered_step,
    CALLBACK_PATH: _Call.callback,
    CALLBACK_NUMBER_PATH: _Call.callback_number,
    CALLBACK_CONFIRM_PATH: _Call.callback_confirm,
    VOICEMAIL_PATH: _Call.recorded,
    RECORDING_PATH: _Call.recording_status,
    DIAL_RESULT_PATH: _Call.dial_result,
    STATUS_PATH: _Call.status,
}


def _extend(path: str, token: str) -> str:
    return f"{path}.{token}" if path else token


def _int(text: str, low: int, high: int) -> int:
    """A whole number in [low, high] from a request field; `low` for anything else."""
    if not text.isdecimal() or len(text) > 12:
        return low
    return min(max(int(text), low), high)


def _seconds(start: datetime | None, end: datetime | None) -> int:
    if start is None or end is None:
        return 0
    return max(0, round((end - start).total_seconds()))


def _plus(at: datetime, seconds: int) -> datetime:
    return at + timedelta(seconds=seconds)
