"""The satisfaction survey without I/O: tokens, texts per channel, answers, the contact event."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.contact import ContactEvent, InvalidContactEvent, encode_contact_event
from inbox.contact import parse_contact_event as parse_event
from inbox.surveys import (
    MAX_COMMENT_CHARS,
    TEXT_QUESTION,
    InvalidAnswer,
    InvalidSurveyToken,
    SurveyRef,
    Surveys,
    _b64,
    _mac,
    parse_comment,
    parse_score,
    read_survey_token,
    survey_event,
    survey_token,
)
from inbox.thread_tokens import from_token

SECRET = b"survey-secret-0123456789abcdef"
OTHER_SECRET = b"another-secret-0123456789abcdef"
CONVERSATION = "6f1c1c5e-8b0a-4c53-9a57-2f4d3b1e0a11"
MESSAGE = "9b2e4f0c1d2a43b5a6c7d8e9f0a1b2c3"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
URL = re.compile(r"https?://\S+")


async def _no_email(conversation_id: str) -> str | None:
    return None


def surveys(public_url: str = "https://help.example.com/") -> Surveys:
    return Surveys(public_url=public_url, secret=SECRET, publisher=None, customer_email=_no_email)


# --------------------------------------------------------------------------- tokens


def test_a_token_reads_back_as_the_survey_it_names() -> None:
    # given a token made for a conversation's survey message
    token = survey_token(SECRET, CONVERSATION, MESSAGE)
    # when it is read back with the same secret
    survey = read_survey_token(SECRET, token)
    # then it names that survey, and its characters need no escaping in a URL
    assert survey == SurveyRef(CONVERSATION, MESSAGE)
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{22}", token)


def test_the_conversation_id_is_read_back_in_canonical_form() -> None:
    # given a conversation id in upper case without dashes
    token = survey_token(SECRET, uuid.UUID(CONVERSATION).hex.upper(), MESSAGE)
    # when read back, then it is the canonical UUID string
    assert read_survey_token(SECRET, token).conversation_id == CONVERSATION


@settings(max_examples=200, deadline=None)
@given(st.uuids(), st.text(min_size=1, max_size=200))
def test_every_survey_round_trips(conversation: uuid.UUID, message_id: str) -> None:
    # given any conversation and any message id (dots and non-ASCII included)
    token = survey_token(SECRET, str(conversation), message_id)
    # when read back, then the same pair comes out
    assert read_survey_token(SECRET, token) == SurveyRef(str(conversation), message_id)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    # given a token someone made with a key that is not ours
    forged = survey_token(OTHER_SECRET, CONVERSATION, MESSAGE)
    # when read, then it is refused
    with pytest.raises(InvalidSurveyToken, match="signature"):
        read_survey_token(SECRET, forged)


def test_another_conversation_under_a_real_signature_is_refused() -> None:
    # given a real token whose first half is replaced by another conversation's
    real = survey_token(SECRET, CONVERSATION, MESSAGE)
    other = survey_token(SECRET, str(uuid.uuid4()), MESSAGE)
    spliced = other.partition(".")[0] + "." + real.partition(".")[2]
    # when read, then it is refused
    with pytest.raises(InvalidSurveyToken):
        read_survey_token(SECRET, spliced)


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t[:-1],  # truncated signature
        lambda t: t.partition(".")[0],  # no signature at all
        lambda t: t + "A",  # longer signature
        lambda t: t + "=",  # padded
        lambda t: "A" + t,  # longer body
        lambda t: t.replace(".", "", 1),  # no separator
        lambda t: t + "." + t,  # two tokens
        lambda t: "",
    ],
)
def test_a_damaged_token_is_refused(damage: Callable[[str], str]) -> None:
    # given a real token, damaged
    token = damage(survey_token(SECRET, CONVERSATION, MESSAGE))
    # when read, then it is refused
    with pytest.raises(InvalidSurveyToken):
        read_survey_token(SECRET, token)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_changing_any_one_character_is_refused(data: st.DataObject) -> None:
    # given a real token with one character replaced by another
    token = survey_token(SECRET, CONVERSATION, MESSAGE)
    position = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters().filter(lambda c: c != token[position]))
    altered = token[:position] + replacement + token[position + 1 :]
    # when read, then it is refused
    with pytest.raises(InvalidSurveyToken):
        read_survey_token(SECRET, altered)


def _signed_body(text: str) -> str:
    """A token over any text, signed with our key (as a key shared with another use might)."""
    body = _b64(text.encode())
    return f"{body}.{_mac(SECRET, body)}"


@pytest.mark.parametrize(
    "text", ["no-dot-here", f"{CONVERSATION}.", f"not-a-uuid.{MESSAGE}", ".", ""]
)
def test_a_signed_token_that_names_no_survey_is_refused(text: str) -> None:
    with pytest.raises(InvalidSurveyToken):
        read_survey_token(SECRET, _signed_body(text))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=600),
        st.from_regex(r"[A-Za-z0-9_-]{0,150}\.[A-Za-z0-9_-]{0,30}", fullmatch=True),
    )
)
def test_any_string_is_a_survey_or_a_refusal(token: str) -> None:
    # given any string as the path's token; when read; then a survey or InvalidSurveyToken
    try:
        survey = read_survey_token(SECRET, token)
    except InvalidSurveyToken:
        return
    # The only strings accepted are the ones survey_token makes.
    assert survey_token(SECRET, survey.conversation_id, survey.message_id) == token


@pytest.mark.parametrize("message_id", ["", "x" * 201])
def test_no_token_for_an_empty_or_long_message_id(message_id: str) -> None:
    with pytest.raises(ValueError, match="message id"):
        survey_token(SECRET, CONVERSATION, message_id)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Surveys(public_url="https://x", secret=b"short", publisher=None, customer_email=_no_email)


# --------------------------------------------------------------------------- texts


@pytest.mark.parametrize("channel", ["sms", "whatsapp", "chat", "messenger", "instagram"])
def test_text_channels_ask_for_a_digit(channel: str) -> None:
    # when the survey for a text channel is made
    text = surveys().text(channel, CONVERSATION, MESSAGE)
    # then it asks for a reply of 1-5, short enough for one SMS segment (GSM-7: ASCII here)
    assert text == TEXT_QUESTION
    assert "1 (poor)" in text
    assert "5 (excellent)" in text
    assert len(text) <= 160
    assert text.isascii()


def test_email_has_five_links_one_per_score() -> None:
    # when the survey for email is made
    text = surveys("https://help.example.com/").text("email", CONVERSATION, MESSAGE)
    # then it holds five links to /csat/{token}?score=N, N = 1..5, one token for all
    assert text is not None
    links = [urlsplit(link) for link in URL.findall(text)]
    assert [parse_qs(link.query) for link in links] == [{"score": [str(n)]} for n in range(1, 6)]
    assert {(link.scheme, link.netloc) for link in links} == {("https", "help.example.com")}
    [path] = {link.path for link in links}
    assert path.startswith("/csat/")
    assert read_survey_token(SECRET, path.removeprefix("/csat/")) == SurveyRef(
        CONVERSATION, MESSAGE
    )


@pytest.mark.parametrize("channel", ["voice", "fax", ""])
def test_no_survey_where_it_cannot_be_answered(channel: str) -> None:
    assert surveys().text(channel, CONVERSATION, MESSAGE) is None


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("raw", "score"), [(1, 1), (5, 5), ("3", 3), (" 4 ", 4), ("5\n", 5)])
def test_a_score_from_1_to_5_is_taken(raw: object, score: int) -> None:
    assert parse_score(raw) == score


@pytest.mark.parametrize("raw", [0, 6, -1, True, 4.0, "0", "6", "", "44", "four", None, [4]])
def test_any_other_score_is_refused(raw: object) -> None:
    with pytest.raises(InvalidAnswer, match="1 to 5"):
        parse_score(raw)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=20), st.integers(), st.none(), st.booleans(), st.floats()))
def test_any_score_input_is_a_score_or_a_refusal(raw: object) -> None:
    try:
        score = parse_score(raw)
    except InvalidAnswer:
        return
    assert score in (1, 2, 3, 4, 5)


def test_comments_are_trimmed_and_empty_means_none() -> None:
    assert parse_comment("  quick and kind \n") == "quick and kind"
    assert parse_comment("   ") is None
    assert parse_comment(None) is None


@pytest.mark.parametrize("raw", ["x" * (MAX_COMMENT_CHARS + 1), 5, ["a"]])
def test_a_long_or_non_text_comment_is_refused(raw: object) -> None:
    with pytest.raises(InvalidAnswer, match="comment"):
        parse_comment(raw)


# --------------------------------------------------------------------------- the event


def test_an_answer_is_one_csat_contact_event_of_the_customer() -> None:
    # given an answer to a survey
    survey = SurveyRef(CONVERSATION, MESSAGE)
    # when it becomes a contact event
    event = survey_event(survey, email="Alice@Example.com", score=4, comment="ok", now=NOW)
    # then it is a valid csat.submitted from that customer's email, naming the conversation
    assert event == ContactEvent(
        event_id=f"csat:{CONVERSATION}:{MESSAGE}",
        occurred_at=NOW,
        channel="email",
        type="csat.submitted",
        customer=event.customer,
        thread=event.thread,
        payload={"score": 4, "comment": "ok", "conversation": CONVERSATION, "survey": MESSAGE},
    )
    assert event.customer.email == "alice@example.com"
    assert event.key == "email:alice@example.com"
    assert event.thread.ref is not None
    assert str(from_token(event.thread.ref)) == CONVERSATION  # ingest threads it there
    assert parse_event(encode_contact_event(event), now=NOW) == event


def test_every_answer_to_one_survey_has_the_same_event_id() -> None:
    # given two different answers to the same survey
    survey = SurveyRef(CONVERSATION, MESSAGE)
    first = survey_event(survey, email="a@example.com", score=1, comment=None, now=NOW)
    second = survey_event(survey, email="a@example.com", score=5, comment="x", now=NOW)
    # then they share the event id: the ingest worker takes the first only
    assert first.event_id == second.event_id
    other = survey_event(
        SurveyRef(CONVERSATION, "another"), email="a@example.com", score=5, comment=None, now=NOW
    )
    assert other.event_id != first.event_id


def test_an_unusable_email_address_is_refused() -> None:
    with pytest.raises(InvalidContactEvent, match="email"):
        survey_event(
            SurveyRef(CONVERSATION, MESSAGE), email="not an address", score=3, comment=None, now=NOW
        )
