"""The voice call flow: given a step's request (form, query), the time and what is known of the
call, the TwiML answered and the contact events to publish. No I/O."""

from __future__ import annotations

import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.contact import ContactEvent, validate
from ivr.flow import (
    ANSWERED_PATH,
    CALLBACK_CONFIRM_PATH,
    CALLBACK_NUMBER_PATH,
    DIAL_RESULT_PATH,
    GATHER_PATH,
    QUEUE_RESULT_PATH,
    RECORDING_PATH,
    STATUS_PATH,
    VOICE_PATH,
    VOICEMAIL_PATH,
    WAIT_KEY_PATH,
    WAIT_PATH,
    CallRecord,
    MalformedVoiceRequest,
    QueueInfo,
    Step,
    answered_url,
    handle,
    keyed_number,
    parse_request,
    spoken_number,
)
from ivr.menu import BUNDLED_EXAMPLE, Menu, parse_menu
from ivr.twiml import agent_leg

BASE = "https://ivr.example.com"
SID = "CA5f0a1b2c3d4e5f60718293a4b5c6d7e8"
CALLER = "+14155550123"
# Friday 27 November 2026, 11:00 in Berlin: the bundled menu's office is open.
OPEN = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
SUNDAY = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
RECORDING = "RE" + "ab" * 16


def _example() -> Menu:
    menu, problems = parse_menu(tomllib.loads(BUNDLED_EXAMPLE.read_text(encoding="utf-8")))
    assert menu is not None, problems
    return menu


MENU = _example()


@dataclass
class Answer:
    step: Step
    root: ET.Element

    @property
    def events(self) -> list[ContactEvent]:
        return list(self.step.events)

    def types(self) -> list[str]:
        return [e.type for e in self.step.events]

    def verbs(self) -> list[str]:
        return [child.tag for child in self.root]

    def said(self) -> str:
        return " ".join(e.text or "" for e in self.root.iter("Say"))

    def one(self, tag: str) -> ET.Element:
        [element] = list(self.root.iter(tag))
        return element

    def next_url(self, tag: str = "Gather") -> tuple[str, dict[str, str]]:
        """The path and query of the action (or Redirect target) Twilio posts next."""
        element = self.one(tag)
        target = element.text if tag == "Redirect" else element.get("action")
        assert target is not None
        parts = urlsplit(target)
        assert f"{parts.scheme}://{parts.netloc}" == BASE
        return parts.path, dict(parse_qsl(parts.query))


def form(**fields: str) -> dict[str, str]:
    return {"CallSid": SID, "From": CALLER, "To": "+15005550006", **fields}


def step(
    path: str,
    query: dict[str, str] | None = None,
    *,
    now: datetime = OPEN,
    record: CallRecord | None = None,
    info: QueueInfo | None = None,
    menu: Menu = MENU,
    fields: dict[str, str] | None = None,
    **more_fields: str,
) -> Answer:
    request = parse_request(path, query or {}, form(**(fields or {}), **more_fields))
    result = handle(menu, request, base_url=BASE, now=now, record=record, queue_info=info)
    for event in result.events:
        validate(event, now=now)  # every event is a valid contact event
        assert event.channel == "voice"
    return Answer(result, ET.fromstring(result.twiml))


def at_main(lang: str = "en", path: str = "1.h", attempt: int = 0) -> dict[str, str]:
    return {"node": "main", "attempt": str(attempt), "lang": lang, "path": path}


# --------------------------------------------------------------------------- incoming


def test_incoming_call_starts_and_asks_the_language_in_every_language() -> None:
    answer = step(VOICE_PATH)
    [started] = answer.events
    assert started.type == "call.started"
    assert started.event_id == f"{SID}:started"
    assert started.payload == {"call_sid": SID, "to": "+15005550006"}
    assert started.customer.phone == CALLER
    assert started.thread.ref == SID
    assert answer.verbs() == ["Gather", "Redirect"]
    gather = answer.one("Gather")
    assert gather.get("input") == "dtmf speech"
    assert gather.get("numDigits") == "1"
    assert gather.get("language") == "en-US"
    assert "deutsch" in (gather.get("hints") or "")
    says = list(gather.iter("Say"))
    assert [s.get("language") for s in says] == ["en-US", "de-DE", "es-ES"]
    assert [s.get("voice") for s in says] == ["Polly.Joanna", "Polly.Vicki", "Polly.Lucia"]
    assert answer.next_url() == (GATHER_PATH, {"lang": "en", "node": "welcome", "attempt": "0"})
    # no input: the same step again, without Digits
    assert answer.next_url("Redirect") == answer.next_url()
    assert answer.step.record == CallRecord(started_at=OPEN, language="en")


def test_an_anonymous_caller_is_known_by_the_call() -> None:
    request = parse_request(VOICE_PATH, {}, form(From="+266696687"))
    assert request.caller is None
    assert request.customer.visitor == f"call-{SID}"
    assert request.customer.phone is None


def test_a_request_without_call_sid_is_malformed() -> None:
    with pytest.raises(MalformedVoiceRequest):
        parse_request(VOICE_PATH, {}, {"From": CALLER})


# --------------------------------------------------------------------------- navigation


def test_choosing_german_by_digit_checks_the_hours_and_asks_the_main_menu_in_german() -> None:
    answer = step(GATHER_PATH, {"node": "welcome", "attempt": "0", "lang": "en"}, Digits="2")
    language, hours = answer.events
    assert language.event_id == f"{SID}:ivr:2"
    assert language.payload == {
        "call_sid": SID,
        "node": "welcome",
        "choice": "2",
        "path": "2",
        "action": "language",
        "language": "de",
    }
    assert hours.event_id == f"{SID}:ivr:2.h"
    assert hours.payload["choice"] == "open"
    assert hours.payload["action"] == "hours"
    assert answer.next_url() == (
        GATHER_PATH,
        {"lang": "de", "node": "main", "attempt": "0", "path": "2.h"},
    )
    assert answer.one("Say").get("language") == "de-DE"
    assert "Rechnung" in answer.said()


def test_choosing_spanish_by_speech_in_a_multilingual_menu() -> None:
    query = {"node": "welcome", "attempt": "0", "lang": "en"}
    answer = step(GATHER_PATH, query, SpeechResult="Español, por favor.")
    assert answer.events[0].payload["language"] == "es"
    assert answer.events[0].payload["speech"] == "Español, por favor."
    assert answer.events[0].payload["choice"] == "3"  # the option, however it was chosen
    assert answer.next_url()[1]["lang"] == "es"


def test_billing_by_speech_queues_the_call_with_its_skill() -> None:
    answer = step(GATHER_PATH, at_main(), SpeechResult="I have a billing question")
    selected, queued = answer.events
    assert selected.payload["action"] == "queue"
    assert selected.payload["path"] == "1.h.1"
    assert queued.type == "call.queued"
    assert queued.event_id == f"{SID}:queued:1.h.1"
    assert queued.payload == {
        "call_sid": SID,
        "queue": "billing",
        "priority": 0,
        "skill": "billing",
        "language": "en",
    }
    enqueue = answer.one("Enqueue")
    assert enqueue.text == "billing"
    assert answer.next_url("Enqueue")[0] == QUEUE_RESULT_PATH
    wait = urlsplit(enqueue.get("waitUrl") or "")
    assert wait.path == WAIT_PATH
    assert dict(parse_qsl(wait.query)) == {"lang": "en", "queue": "billing", "path": "1.h.1"}
    assert answer.step.record == CallRecord(queue="billing", queued_at=OPEN, language="en")


def test_technical_support_has_priority_one() -> None:
    answer = step(GATHER_PATH, at_main(), Digits="2")
    assert answer.events[1].payload["priority"] == 1
    assert answer.events[1].payload["skill"] == "tech"


def test_speech_is_matched_in_the_callers_language_only() -> None:
    answer = step(GATHER_PATH, at_main("de"), SpeechResult="billing")  # English word
    assert answer.events == []
    assert "nicht verstanden" in answer.said()


def test_supervisor_request_is_marked_as_such() -> None:
    answer = step(GATHER_PATH, at_main(), Digits="5")
    selected, queued = answer.events
    assert selected.payload["action"] == "supervisor"
    assert queued.payload["queue"] == "supervisors"


def test_repeat_option_goes_back_to_the_same_menu() -> None:
    answer = step(GATHER_PATH, at_main(), Digits="9")
    assert answer.events[0].payload["action"] == "menu"
    assert answer.next_url()[1] == at_main(path="1.h.9")


def test_transfer_dials_the_number_and_is_remembered() -> None:
    answer = step(GATHER_PATH, at_main(), Digits="0")
    assert answer.one("Number").text == "+14155550100"
    assert answer.next_url("Dial")[0] == DIAL_RESULT_PATH
    assert answer.step.record is not None
    assert answer.step.record.outcome == "transfer"
    assert step(DIAL_RESULT_PATH).verbs() == ["Hangup"]


def test_an_invalid_choice_repeats_the_prompt_then_takes_the_default() -> None:
    first = step(GATHER_PATH, at_main(), Digits="7")
    assert first.events == []
    assert first.said().startswith("Sorry, I did not get that.")
    assert first.next_url()[1]["attempt"] == "1"
    second = step(GATHER_PATH, at_main(attempt=1))  # no input at all
    assert second.events == []
    assert second.next_url()[1]["attempt"] == "2"
    last = step(GATHER_PATH, at_main(attempt=2), Digits="8")
    selected, queued = last.events
    assert selected.payload["choice"] == "default"
    assert selected.event_id == f"{SID}:ivr:1.h.d"
    assert queued.payload["queue"] == "default"


def test_after_hours_the_call_goes_to_voicemail() -> None:
    answer = step(GATHER_PATH, {"node": "welcome", "lang": "en"}, now=SUNDAY, Digits="1")
    _, hours = answer.events
    assert hours.payload["choice"] == "closed"
    assert hours.event_id == f"{SID}:ivr:1.h"
    assert "Our hotline is open Monday to Friday" in answer.said()
    record = answer.one("Record")
    assert record.get("maxLength") == "120"
    assert answer.next_url("Record")[0] == VOICEMAIL_PATH
    assert urlsplit(record.get("recordingStatusCallback") or "").path == RECORDING_PATH
    assert answer.verbs()[-1] == "Hangup"  # nothing recorded


def test_a_holiday_is_after_hours() -> None:
    christmas = datetime(2026, 12, 25, 10, 0, tzinfo=UTC)  # a Friday
    answer = step(GATHER_PATH, {"node": "welcome", "lang": "en"}, now=christmas, Digits="1")
    assert answer.events[1].payload["choice"] == "closed"


# --------------------------------------------------------------------------- lost steps


def test_an_unknown_node_starts_the_menu_again_recorded_once() -> None:
    answer = step(GATHER_PATH, {"node": "billing-old", "lang": "de", "path": "2.h"}, Digits="1")
    [restart] = answer.events
    assert restart.event_id == f"{SID}:ivr:2.h.r"
    assert restart.payload["action"] == "restart"
    assert restart.payload["node"] == "billing-old"
    assert answer.next_url()[1] == {
        "lang": "de",
        "node": "welcome",
        "attempt": "0",
        "path": "2.h.r",
    }
    again = step(GATHER_PATH, {"node": "billing-old", "lang": "de", "path": "2.h"}, Digits="1")
    assert again.step == answer.step


def test_an_unknown_step_url_and_a_garbled_path_restart_too() -> None:
    answer = step(VOICE_PATH + "/old/step", {"path": "<script>"})
    assert answer.events[0].event_id == f"{SID}:ivr:r"
    assert answer.next_url()[1]["node"] == "welcome"


# --------------------------------------------------------------------------- waiting


def wait_query() -> dict[str, str]:
    return {"queue": "billing", "lang": "en", "path": "1.h.1"}


def test_the_wait_loop_says_position_and_estimate_rounded_up() -> None:
    answer = step(WAIT_PATH, wait_query(), info=QueueInfo(3, 200.0, 2))
    assert answer.events == []
    said = answer.said()
    assert "You are number 3 in line." in said
    assert "about 4 minutes" in said
    assert "press star" in said
    gather = answer.one("Gather")
    assert gather.get("input") == "dtmf"
    assert answer.one("Play").text == MENU.hold_music  # inside the Gather: keys interrupt it
    assert answer.next_url() == (WAIT_KEY_PATH, wait_query())
    assert answer.next_url("Redirect") == (WAIT_PATH, wait_query())


@pytest.mark.parametrize(
    ("info", "expected", "absent"),
    [
        (QueueInfo(1, 30.0, 1), "less than a minute", "about"),
        (QueueInfo(1, 60.0, 1), "about one minute", "minutes"),
        (QueueInfo(2, None, 1), "cannot estimate", "busy"),
        (QueueInfo(None, None, 0), "All our agents are busy", "number"),
    ],
)
def test_the_wait_loop_is_honest_about_the_estimate(
    info: QueueInfo, expected: str, absent: str
) -> None:
    said = step(WAIT_PATH, wait_query(), info=info).said()
    assert expected in said
    assert absent not in said
    assert "press star" in said  # the callback is always offered


def test_twilios_queue_position_is_used_when_ours_is_unknown() -> None:
    answer = step(WAIT_PATH, wait_query(), info=QueueInfo(None, 90.0, 1), QueuePosition="4")
    assert "number 4 in line" in answer.said()


def test_a_key_other_than_star_keeps_waiting() -> None:
    answer = step(WAIT_KEY_PATH, wait_query(), Digits="5")
    assert answer.verbs() == ["Redirect"]
    assert answer.next_url("Redirect") == (WAIT_PATH, wait_query())


def test_queue_result_hangup_is_an_abandon() -> None:
    answer = step(QUEUE_RESULT_PATH, wait_query(), QueueResult="hangup", QueueTime="47")
    [abandoned] = answer.events
    assert abandoned.event_id == f"{SID}:abandoned"
    assert abandoned.payload == {"call_sid": SID, "queue": "billing", "queue_seconds": 47}
    assert answer.step.record is not None
    assert answer.step.record.outcome == "abandoned"


def test_queue_result_bridged_reports_the_answer_and_says_goodbye() -> None:
    queued = CallRecord(started_at=OPEN, queue="billing", queued_at=OPEN + timedelta(seconds=20))
    answer = step(
        QUEUE_RESULT_PATH, wait_query(), record=queued, QueueResult="bridged", QueueTime="40"
    )
    [answered] = answer.events
    assert answered.event_id == f"{SID}:answered"
    assert answer.verbs()[-1] == "Hangup"
    assert answer.step.record is not None
    assert answer.step.record.answered_at == OPEN + timedelta(seconds=60)


def test_the_talk_time_ends_with_the_bridge_not_with_the_goodbye() -> None:
    record = CallRecord(started_at=OPEN, queue="billing", answered_at=OPEN + timedelta(seconds=30))
    bridged = step(
        QUEUE_RESULT_PATH,
        wait_query(),
        now=OPEN + timedelta(seconds=130),
        record=record,
        QueueResult="bridged",
        QueueTime="25",
    )
    assert bridged.step.record is not None
    [ended] = status(bridged.step.record, "140").events
    assert ended.payload["talk_seconds"] == 100


def test_redirected_to_an_agent_by_the_connector_is_no_abandon() -> None:
    queued = CallRecord(started_at=OPEN, queue="billing", queued_at=OPEN)
    redirected = step(
        QUEUE_RESULT_PATH,
        wait_query(),
        now=OPEN + timedelta(seconds=40),
        record=queued,
        QueueResult="redirected",
        QueueTime="40",
    )
    assert redirected.events == []  # the connector publishes call.answered
    [ended] = status(redirected.step.record, "100").events
    assert ended.type == "call.ended"
    assert ended.payload["talk_seconds"] == 60


def test_queue_full_goes_to_voicemail() -> None:
    answer = step(QUEUE_RESULT_PATH, wait_query(), QueueResult="queue-full")
    assert "Record" in answer.verbs()


def test_the_agent_leg_takes_the_caller_and_reports_the_answer() -> None:
    url = answered_url(BASE, "billing", "alice")
    leg = ET.fromstring(agent_leg("billing", url))
    queue = leg.find("./Dial/Queue")
    assert queue is not None
    assert queue.text == "billing"
    assert queue.get("url") == url
    answer = step(ANSWERED_PATH, {"queue": "billing", "agent": "alice"}, QueueTime="33")
    [answered] = answer.events
    assert answered.payload == {
        "call_sid": SID,
        "queue": "billing",
        "queue_seconds": 33,
        "agent": "alice",
    }
    assert answer.step.record is not None
    assert answer.step.record.agent == "alice"


# --------------------------------------------------------------------------- callbacks


def test_callback_from_the_menu_confirms_the_caller_id() -> None:
    offer = step(GATHER_PATH, at_main(), Digits="3")
    assert offer.events[0].payload["action"] == "callback"
    assert "We can call you back at 4, 1, 5, 5, 5, 5, 0, 1, 2, 3." in offer.said()
    path, query = offer.next_url()
    assert path == CALLBACK_NUMBER_PATH
    assert query["inq"] == "0"
    assert query["tries"] == "0"
    assert query["queue"] == "default"
    assert offer.one("Gather").get("finishOnKey") == "#"
    done = step(path, query, Digits="1")
    [requested] = done.events
    assert requested.type == "callback.requested"
    assert requested.event_id == f"{SID}:callback"
    assert requested.payload["number"] == CALLER
    assert requested.payload["queue"] == "default"
    assert done.verbs()[-1] == "Hangup"


def test_callback_while_queued_keys_another_number_reads_it_back_and_leaves_the_queue() -> None:
    offer = step(WAIT_KEY_PATH, wait_query(), Digits="*")
    assert offer.events == []
    path, query = offer.next_url()
    assert query["inq"] == "1"
    readback = step(path, query, Digits="4155550199")
    assert readback.events == []
    assert "You entered 4, 1, 5, 5, 5, 5, 0, 1, 9, 9." in readback.said()
    path, query = readback.next_url()
    assert path == CALLBACK_CONFIRM_PATH
    assert query["number"] == "+14155550199"
    done = step(path, query, Digits="1")
    [requested] = done.events
    assert requested.payload["number"] == "+14155550199"
    assert requested.payload["queue"] == "billing"
    assert requested.payload["in_queue"] is True
    assert done.verbs()[-1] == "Leave"
    assert done.step.record is not None
    assert done.step.record.outcome == "callback"
    after = step(QUEUE_RESULT_PATH, wait_query(), record=done.step.record, QueueResult="leave")
    assert after.events == []
    assert after.verbs() == ["Hangup"]


def test_a_german_caller_keys_a_national_number() -> None:
    query = {"queue": "default", "lang": "de", "path": "2.h.3", "inq": "0", "tries": "0"}
    answer = step(CALLBACK_NUMBER_PATH, query, From="+4930901820", Digits="089123456#")
    assert answer.next_url()[1]["number"] == "+4989123456"
    assert "0, 8, 9, 1, 2, 3, 4, 5, 6" in answer.said()


def test_an_invalid_number_is_asked_for_again_twice_then_voicemail() -> None:
    query = {"queue": "default", "lang": "en", "path": "1.h.3", "inq": "0", "tries": "0"}
    first = step(CALLBACK_NUMBER_PATH, query, Digits="12")
    assert "not a valid phone number" in first.said()
    path, query = first.next_url()
    assert query["tries"] == "1"
    assert "enter the number" in first.said()  # the caller id is not offered again
    second = step(path, query, Digits="")
    path, query = second.next_url()
    assert query["tries"] == "2"
    third = step(path, query, Digits="99")
    assert third.events == []
    assert "Record" in third.verbs()
    assert third.step.record is not None
    assert third.step.record.outcome == "voicemail"


def test_invalid_twice_while_queued_leaves_the_queue_for_voicemail() -> None:
    query = {"queue": "billing", "lang": "en", "path": "1.h.1", "inq": "1", "tries": "2"}
    answer = step(CALLBACK_CONFIRM_PATH, query | {"number": "+14155550199"}, Digits="2")
    assert answer.verbs()[-1] == "Leave"
    left = step(QUEUE_RESULT_PATH, wait_query(), record=answer.step.record, QueueResult="leave")
    assert "Record" in left.verbs()


def test_keyed_numbers() -> None:
    assert keyed_number("4155550199", "US") == "+14155550199"
    assert keyed_number("00442079460018", "DE") == "+442079460018"
    assert keyed_number("01144 2079460018".replace(" ", ""), "US") == "+442079460018"
    assert keyed_number("12", "US") is None
    assert keyed_number("", "US") is None
    assert spoken_number("+442079460018", "+14155550123").startswith("+, 4, 4")


# --------------------------------------------------------------------------- voicemail


def test_the_recording_is_a_voice_message_reported_once_by_action_or_status() -> None:
    recording = {
        "RecordingUrl": f"https://api.twilio.com/2010-04-01/Recordings/{RECORDING}",
        "RecordingSid": RECORDING,
        "RecordingDuration": "14",
    }
    action = step(VOICEMAIL_PATH, {"lang": "en", "queue": "default"}, fields=recording)
    [message] = action.events
    assert message.type == "message.received"
    assert message.event_id == f"{SID}:voicemail:{RECORDING}"
    assert message.payload["text"] == "(voicemail)"
    assert message.payload["message_id"] == RECORDING
    assert message.payload["attachments"] == [
        {"name": "voicemail", "type": "audio/wav", "size": 0, "ref": recording["RecordingUrl"]}
    ]
    assert action.verbs()[-1] == "Hangup"
    status = step(
        RECORDING_PATH,
        {"lang": "en", "queue": "default"},
        fields=recording | {"RecordingStatus": "completed"},
    )
    assert [e.event_id for e in status.events] == [message.event_id]
    assert step(VOICEMAIL_PATH, {"lang": "en"}).events == []  # nothing recorded


# --------------------------------------------------------------------------- the call's end


def status(record: CallRecord | None, duration: str = "183") -> Answer:
    return step(STATUS_PATH, record=record, CallStatus="completed", CallDuration=duration)


def test_a_hang_up_in_the_ivr_is_no_abandon() -> None:
    [ended] = status(CallRecord(started_at=OPEN)).events
    assert ended.type == "call.ended"
    assert ended.event_id == f"{SID}:ended"
    assert ended.payload == {"call_sid": SID, "ended_in": "ivr", "duration_seconds": 183}


def test_a_hang_up_while_queued_is_an_abandon_with_the_queue_time() -> None:
    record = CallRecord(started_at=OPEN, queue="billing", queued_at=OPEN + timedelta(seconds=23))
    [abandoned] = status(record, "70").events
    assert abandoned.type == "call.abandoned"
    assert abandoned.event_id == f"{SID}:abandoned"
    assert abandoned.payload == {"call_sid": SID, "queue": "billing", "queue_seconds": 47}


def test_the_queue_result_and_the_status_report_one_abandon() -> None:
    record = CallRecord(started_at=OPEN, queue="billing", queued_at=OPEN)
    result = step(
        QUEUE_RESULT_PATH, wait_query(), record=record, QueueResult="hangup", QueueTime="47"
    )
    again = status(result.step.record, "90")
    assert again.events == result.events  # same id and payload: the ingest keeps one


def test_an_answered_call_ends_with_its_talk_time() -> None:
    record = CallRecord(
        started_at=OPEN,
        queue="billing",
        queued_at=OPEN + timedelta(seconds=20),
        answered_at=OPEN + timedelta(seconds=50),
        agent="alice",
    )
    [ended] = status(record, "200").events
    assert ended.payload["talk_seconds"] == 150
    assert ended.payload["hold_seconds"] == 0
    assert ended.payload["wrap_seconds"] == 0
    assert ended.payload["agent"] == "alice"


def test_a_callback_requested_is_no_abandon() -> None:
    record = CallRecord(started_at=OPEN, queue="billing", queued_at=OPEN, outcome="callback")
    [ended] = status(record).events
    assert ended.type == "call.ended"
    assert ended.payload["ended_in"] == "callback"


def test_a_call_this_process_does_not_know_ends_as_unknown() -> None:
    [ended] = status(None).events
    assert ended.payload["ended_in"] == "unknown"
    assert "talk_seconds" not in ended.payload  # not a handled call


def test_intermediate_statuses_are_acknowledged_only() -> None:
    answer = step(STATUS_PATH, CallStatus="in-progress")
    assert answer.events == []
    assert answer.verbs() == []


# --------------------------------------------------------------------------- retries, fuzz


@pytest.mark.parametrize(
    ("path", "query", "fields"),
    [
        (VOICE_PATH, {}, {}),
        (GATHER_PATH, {"node": "welcome", "lang": "en"}, {"Digits": "2"}),
        (GATHER_PATH, at_main(), {"SpeechResult": "billing"}),
        (GATHER_PATH, at_main(attempt=2), {"Digits": "#"}),
        (QUEUE_RESULT_PATH, wait_query(), {"QueueResult": "hangup", "QueueTime": "5"}),
        (STATUS_PATH, {}, {"CallStatus": "completed", "CallDuration": "5"}),
    ],
)
def test_a_retried_request_gets_the_same_answer_and_events(
    path: str, query: dict[str, str], fields: dict[str, str]
) -> None:
    first = step(path, query, fields=fields)
    second = step(path, query, fields=fields)
    assert first.step == second.step


_paths = st.sampled_from(
    [
        VOICE_PATH,
        GATHER_PATH,
        WAIT_PATH,
        WAIT_KEY_PATH,
        QUEUE_RESULT_PATH,
        ANSWERED_PATH,
        VOICE_PATH + "/callback",
        CALLBACK_NUMBER_PATH,
        CALLBACK_CONFIRM_PATH,
        VOICEMAIL_PATH,
        RECORDING_PATH,
        DIAL_RESULT_PATH,
        STATUS_PATH,
        VOICE_PATH + "/nowhere",
    ]
)
_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["1", "2", "*", "9", "#", "main", "welcome", "en", "de", "1.h", "hangup"]),
    st.integers(-5, 10**13).map(str),
)
_query_keys = st.sampled_from(
    ["node", "attempt", "lang", "path", "queue", "inq", "tries", "number"]
)
_form_keys = st.sampled_from(
    [
        "From",
        "To",
        "Digits",
        "SpeechResult",
        "QueueResult",
        "QueueTime",
        "QueuePosition",
        "CallStatus",
        "CallDuration",
        "RecordingUrl",
        "RecordingSid",
        "RecordingStatus",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    path=_paths,
    query=st.dictionaries(_query_keys, _text, max_size=5),
    fields=st.dictionaries(_form_keys, _text, max_size=6),
    sid=st.one_of(st.just(SID), st.text(max_size=40)),
    record=st.one_of(
        st.none(),
        st.builds(
            CallRecord,
            started_at=st.just(OPEN),
            queue=st.sampled_from([None, "billing"]),
            queued_at=st.sampled_from([None, OPEN]),
            answered_at=st.sampled_from([None, OPEN + timedelta(seconds=9)]),
            outcome=st.sampled_from([None, "callback", "voicemail", "abandoned"]),
        ),
    ),
    info=st.one_of(
        st.none(),
        st.builds(
            QueueInfo,
            st.one_of(st.none(), st.integers(1, 500)),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.integers(0, 20),
        ),
    ),
    now=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
    ),
)
def test_any_request_is_answered_with_twiml_or_refused_never_an_exception(
    path: str,
    query: dict[str, str],
    fields: dict[str, str],
    sid: str,
    record: CallRecord | None,
    info: QueueInfo | None,
    now: datetime,
) -> None:
    try:
        request = parse_request(path, query, {**fields, "CallSid": sid})
    except MalformedVoiceRequest:
        assert sid != SID
        return
    result = handle(MENU, request, base_url=BASE, now=now, record=record, queue_info=info)
    assert ET.fromstring(result.twiml).tag == "Response"
    for event in result.events:
        validate(event, now=now)
        assert event.event_id.startswith(SID + ":")
    again = handle(MENU, request, base_url=BASE, now=now, record=record, queue_info=info)
    assert again == result
