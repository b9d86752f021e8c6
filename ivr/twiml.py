"""TwiML answers, written straight to a string in exactly the form twilio's `VoiceResponse`
writes (attributes in name order, camelCase names, booleans as true/false, ElementTree's
escaping). twilio's builder goes through ElementTree, about half of the flow's time per answer
(docs/ivr.md, "speed"); tests/unit/test_ivr_twiml.py checks the two agree for any text.

`Twiml` is a small typed front holding only what the IVR says: prompts in a language's voice,
`<Gather>` for keys and speech, `<Enqueue>`, `<Redirect>`, `<Leave>`, `<Record>`, `<Dial>` and
`<Hangup>`. `agent_leg` is the TwiML of the agent's side of a queued call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from ivr.menu import Prompt, Voice

DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY = DECLARATION + "<Response />"

Attribute = str | int | bool


@dataclass
class Element:
    """One TwiML verb or noun: its tag, attributes (snake_case, as twilio's builder takes
    them), text and children."""

    tag: str
    attributes: dict[str, Attribute] = field(default_factory=dict)
    text: str | None = None
    children: list[Element] = field(default_factory=list)

    def add(self, tag: str, text: str | None = None, /, **attributes: Attribute | None) -> Element:
        kept = {k: v for k, v in attributes.items() if v is not None}
        child = Element(tag, kept, text)
        self.children.append(child)
        return child

    def write(self, out: list[str]) -> None:
        out.append("<" + self.tag)
        named = {_camel(name): value for name, value in self.attributes.items()}
        for name, value in sorted(named.items(), key=lambda item: item[0]):
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            out.append(f' {name}="{_escape_attribute(text)}"')
        if not self.text and not self.children:
            out.append(" />")
            return
        out.append(">")
        if self.text:
            out.append(_escape_text(self.text))
        for child in self.children:
            child.write(out)
        out.append(f"</{self.tag}>")

    def document(self) -> str:
        out = [DECLARATION]
        self.write(out)
        return "".join(out)


@functools.cache  # a handful of attribute names, each converted once
def _camel(name: str) -> str:
    """twilio's `lower_camel`: finish_on_key -> finishOnKey."""
    if "_" not in name:
        return name
    joined = "".join(part.title() for part in name.split("_"))
    return joined[0].lower() + joined[1:]


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attribute(text: str) -> str:
    text = _escape_text(text).replace('"', "&quot;")
    return text.replace("\r", "&#13;").replace("\n", "&#10;").replace("\t", "&#09;")


class Twiml:
    """One TwiML document being written; verbs go into the open `<Gather>`, if any."""

    def __init__(self) -> None:
        self._response = Element("Response")
        self._target = self._response

    def __str__(self) -> str:
        return self._response.document()

    # --- speech ---------------------------------------------------------------------------

    def say(self, text: str, voice: Voice, own_voice: str | None = None) -> None:
        self._target.add("Say", text, language=voice.locale, voice=own_voice or voice.voice or None)

    def prompt(self, prompt: Prompt, voice: Voice) -> None:
        if prompt.audio is not None:
            self._target.add("Play", prompt.audio)
        elif prompt.text is not None:
            self.say(prompt.text, voice, prompt.voice)

    def play(self, url: str, loop: int = 1) -> None:
        self._target.add("Play", url, loop=loop)

    def pause(self, seconds: int) -> None:
        self._target.add("Pause", length=seconds)

    # --- input ----------------------------------------------------------------------------

    def gather(
        self,
        action: str,
        *,
        timeout: int,
        speech: bool,
        language: str,
        hints: Iterable[str] = (),
        num_digits: int | None = 1,
        finish_on_key: str = "",
    ) -> None:
        """Opens a `<Gather>`: what is said next can be interrupted by a key (or speech).
        Close it with `end_gather()`; the caller's input is posted to `action`."""
        attributes: dict[str, Attribute] = {
            "input": "dtmf speech" if speech else "dtmf",
            "action": action,
            "method": "POST",
            "timeout": timeout,
            "finish_on_key": finish_on_key,
            "action_on_empty_result": False,
        }
        if num_digits is not None:
            attributes["num_digits"] = num_digits
        if speech:
            attributes["speech_timeout"] = "auto"
            attributes["language"] = language
            words = ", ".join(dict.fromkeys(hints))
            if words:
                attributes["hints"] = words
        self._target = self._response.add("Gather", **attributes)

    def end_gather(self) -> None:
        self._target = self._response

    # --- call control ---------------------------------------------------------------------

    def enqueue(self, queue: str, *, wait_url: str, action: str) -> None:
        self.end_gather()
        self._response.add(
            "Enqueue",
            queue,
            wait_url=wait_url,
            wait_url_method="POST",
            action=action,
            method="POST",
        )

    def redirect(self, url: str) -> None:
        self.end_gather()
        self._response.add("Redirect", url, method="POST")

    def leave(self) -> None:
        self.end_gather()
        self._response.add("Leave")

    def record(self, *, action: str, status_callback: str, max_seconds: int) -> None:
        self.end_gather()
        self._response.add(
            "Record",
            action=action,
            method="POST",
            max_length=max_seconds,
            play_beep=True,
            finish_on_key="#",
            recording_status_callback=status_callback,
            recording_status_callback_method="POST",
            recording_status_callback_event="completed",
        )

    def dial(self, number: str, *, action: str) -> None:
        self.end_gather()
        self._response.add("Dial", action=action, method="POST").add("Number", number)

    def hangup(self) -> None:
        self.end_gather()
        self._response.add("Hangup")


def agent_leg(queue: str, answered_url: str) -> str:
    """The TwiML of the agent's call leg: take the first caller waiting in `queue`. Twilio
    fetches `answered_url` for the caller just before bridging, which records `call.answered`
    (build it with `ivr.flow.answered_url`)."""
    response = Element("Response")
    response.add("Dial").add("Queue", queue, url=answered_url, method="POST")
    return response.document()
