"""TwiML answers, built with twilio's `VoiceResponse` (escaping and attribute names are its job).

`Twiml` is a small typed front over it holding only what the IVR says: prompts in a language's
voice, `<Gather>` for keys and speech, `<Enqueue>`, `<Redirect>`, `<Leave>`, `<Record>`,
`<Dial>` and `<Hangup>`. `agent_leg` is the TwiML of the agent's side of a queued call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twilio.twiml.voice_response import Dial, VoiceResponse

from ivr.menu import Prompt, Voice

EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response />'


class Twiml:
    """One TwiML document being written; verbs go into the open `<Gather>`, if any."""

    def __init__(self) -> None:
        self._response: Any = VoiceResponse()
        self._target: Any = self._response

    def __str__(self) -> str:
        return str(self._response)

    # --- speech ---------------------------------------------------------------------------

    def say(self, text: str, voice: Voice, own_voice: str | None = None) -> None:
        attributes = {"language": voice.locale}
        chosen = own_voice or voice.voice
        if chosen:
            attributes["voice"] = chosen
        self._target.say(text, **attributes)

    def prompt(self, prompt: Prompt, voice: Voice) -> None:
        if prompt.audio is not None:
            self._target.play(prompt.audio)
        elif prompt.text is not None:
            self.say(prompt.text, voice, prompt.voice)

    def play(self, url: str, loop: int = 1) -> None:
        self._target.play(url, loop=loop)

    def pause(self, seconds: int) -> None:
        self._target.pause(length=seconds)

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
        attributes: dict[str, Any] = {
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
        self._target = self._response.gather(**attributes)

    def end_gather(self) -> None:
        self._target = self._response

    # --- call control ---------------------------------------------------------------------

    def enqueue(self, queue: str, *, wait_url: str, action: str) -> None:
        self.end_gather()
        self._response.enqueue(
            queue, wait_url=wait_url, wait_url_method="POST", action=action, method="POST"
        )

    def redirect(self, url: str) -> None:
        self.end_gather()
        self._response.redirect(url, method="POST")

    def leave(self) -> None:
        self.end_gather()
        self._response.leave()

    def record(self, *, action: str, status_callback: str, max_seconds: int) -> None:
        self.end_gather()
        self._response.record(
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
        dial: Any = self._response.dial(action=action, method="POST")
        dial.number(number)

    def hangup(self) -> None:
        self.end_gather()
        self._response.hangup()


def agent_leg(queue: str, answered_url: str) -> str:
    """The TwiML of the agent's call leg: take the first caller waiting in `queue`. Twilio
    fetches `answered_url` for the caller just before bridging, which records `call.answered`
    (build it with `ivr.flow.answered_url`)."""
    response: Any = VoiceResponse()
    dial: Any = Dial()
    dial.queue(queue, url=answered_url, method="POST")
    response.append(dial)
    return str(response)
