"""TwiML written by ivr.twiml is exactly what twilio's own `VoiceResponse` writes for the same
verbs (ivr.twiml writes the string itself, for speed): for any text, URL and number."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.twiml.voice_response import Dial, VoiceResponse

from ivr.menu import Prompt, Voice
from ivr.twiml import EMPTY, Twiml, agent_leg

# What a menu file or a caller can put in a prompt, URL or number: any XML-legal text,
# including the characters that must be escaped and line breaks in attributes.
xml_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("&<>\"'\r\n\t"),
    max_size=40,
)
voices = st.builds(Voice, locale=st.sampled_from(["en-US", "fr-FR"]), voice=st.none() | xml_text)


def twilio_say(target: Any, text: str, voice: Voice, own: str | None = None) -> None:
    attributes = {"language": voice.locale}
    if own or voice.voice:
        attributes["voice"] = own or voice.voice or ""
    target.say(text, **attributes)


@settings(max_examples=200, deadline=None)
@given(text=xml_text, url=xml_text, voice=voices, own=st.none() | xml_text)
def test_a_menu_answer_is_written_as_twilio_writes_it(
    text: str, url: str, voice: Voice, own: str | None
) -> None:
    # given a gather with prompts inside, then a redirect, written by both
    ours = Twiml()
    ours.gather(url, timeout=5, speech=True, language=voice.locale, hints=[text, "two", text])
    ours.say(text, voice)
    ours.prompt(Prompt(text=text, voice=own), voice)
    ours.prompt(Prompt(audio=url), voice)
    ours.pause(2)
    ours.redirect(url)
    theirs: Any = VoiceResponse()
    hints = ", ".join(dict.fromkeys([text, "two", text]))
    gather: Any = theirs.gather(
        input="dtmf speech",
        action=url,
        method="POST",
        timeout=5,
        finish_on_key="",
        action_on_empty_result=False,
        num_digits=1,
        speech_timeout="auto",
        language=voice.locale,
        **({"hints": hints} if hints else {}),
    )
    twilio_say(gather, text, voice)
    twilio_say(gather, text, voice, own)
    gather.play(url)
    gather.pause(length=2)
    theirs.redirect(url, method="POST")
    # then the documents are the same string
    assert str(ours) == str(theirs)


Verb = Callable[[Twiml], None]
TheirVerb = Callable[[Any], None]


@settings(max_examples=200, deadline=None)
@given(name=xml_text, url=xml_text, number=xml_text, verb=st.integers(0, 5))
def test_call_control_is_written_as_twilio_writes_it(
    name: str, url: str, number: str, verb: int
) -> None:
    # given one call-control verb after a dtmf-only gather (closed by the verb)
    ours_verbs: list[Verb] = [
        lambda t: t.enqueue(name, wait_url=url, action=number),
        lambda t: t.leave(),
        lambda t: t.record(action=url, status_callback=number, max_seconds=120),
        lambda t: t.dial(number, action=url),
        lambda t: t.hangup(),
        lambda t: t.play(url, loop=0),
    ]
    their_verbs: list[TheirVerb] = [
        lambda r: r.enqueue(
            name, wait_url=url, wait_url_method="POST", action=number, method="POST"
        ),
        lambda r: r.leave(),
        lambda r: r.record(
            action=url,
            method="POST",
            max_length=120,
            play_beep=True,
            finish_on_key="#",
            recording_status_callback=number,
            recording_status_callback_method="POST",
            recording_status_callback_event="completed",
        ),
        lambda r: r.dial(action=url, method="POST").number(number),
        lambda r: r.hangup(),
        lambda r: r.play(url, loop=0),
    ]
    ours = Twiml()
    ours.gather(url, timeout=3, speech=False, language="en-US", num_digits=None, finish_on_key="#")
    if verb == 5:
        ours.end_gather()
    ours_verbs[verb](ours)
    theirs: Any = VoiceResponse()
    theirs.gather(
        input="dtmf", action=url, method="POST", timeout=3, finish_on_key="#",
        action_on_empty_result=False,
    )  # fmt: skip
    their_verbs[verb](theirs)
    # then the same string
    assert str(ours) == str(theirs)


@settings(max_examples=200, deadline=None)
@given(queue=xml_text, url=xml_text)
def test_the_agent_leg_is_written_as_twilio_writes_it(queue: str, url: str) -> None:
    # given the agent's leg of a queued call
    theirs: Any = VoiceResponse()
    dial: Any = Dial()
    dial.queue(queue, url=url, method="POST")
    theirs.append(dial)
    # when written by ivr.twiml, then the same string
    assert agent_leg(queue, url) == str(theirs)


def test_an_empty_document_is_an_empty_response() -> None:
    # given nothing said; when written; then the empty response twilio writes
    assert str(Twiml()) == str(VoiceResponse()) == EMPTY
