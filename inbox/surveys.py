"""The satisfaction survey sent after a resolution (docs/csat.md).

`Surveys.text` is what `Commands.resolve` queues as `SurveyQueued`: on text channels a question
answered with a lone digit (the domain turns that reply into `CsatSubmitted`); on email five
links, one per score, to `/csat/{token}?score=N`; on voice nothing.

`Surveys.routes` serves those links. The token names the conversation and the survey message
and is signed, so nobody can answer for a conversation they were not asked about. A click
becomes one `csat.submitted` contact event whose event_id is derived from the token: the first
answer to a survey counts, later ones carry the same event_id and the ingest worker drops them.
Like every adapter it answers only after Kafka acknowledged, and 503 "try again" when Kafka is
down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message

from adapters.kafka import PublishFailed
from inbox.contact import (
    ContactEvent,
    CustomerRef,
    InvalidContactEvent,
    ThreadRef,
    validate,
    without_nul,
)
from inbox.domain.time import Clock, system_clock
from inbox.ports import Publisher
from inbox.thread_tokens import conversation_token

log = logging.getLogger(__name__)

PATH: Final = "/csat/{token}"
EMAIL: Final = "email"
# Channels whose survey is answered by replying with a digit (Conversation.receive_message).
TEXT_CHANNELS: Final = frozenset({"sms", "whatsapp", "chat", "messenger", "instagram"})
SCORES: Final = (1, 2, 3, 4, 5)
SCORE_LABELS: Final = {1: "poor", 2: "fair", 3: "okay", 4: "good", 5: "excellent"}
TEXT_QUESTION: Final = "How did we do? Reply with a number from 1 (poor) to 5 (excellent)."

_TOKEN_CONTEXT: Final = b"csat-survey/1:"  # keeps these signatures apart from other uses of a key
_MIN_SECRET_BYTES: Final = 16
_MAC_BYTES: Final = 16  # 128 bits: forging by guessing is out of reach, the link stays short
_MAX_MESSAGE_ID_CHARS: Final = 200
_MAX_TOKEN_CHARS: Final = 512  # far above what survey_token makes; nothing longer is decoded
_TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", re.ASCII)
MAX_COMMENT_CHARS: Final = 2000
MAX_BODY_BYTES: Final = 16 * 1024

CustomerEmail = Callable[[str], Awaitable[str | None]]


class InvalidSurveyToken(ValueError):
    """A token we did not sign (forged, altered, truncated): answered 403."""


class InvalidAnswer(ValueError):
    """A score outside 1-5 or an unusable comment: answered 422."""


@dataclass(frozen=True)
class SurveyRef:
    """What a token names: the conversation and the survey's message id (SurveyQueued)."""

    conversation_id: str
    message_id: str

    @property
    def event_id(self) -> str:
        # One per survey, whatever the score or how often it is clicked: the first answer wins.
        return f"csat:{self.conversation_id}:{self.message_id}"


# --------------------------------------------------------------------------- tokens


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _mac(secret: bytes, body: str) -> str:
    digest = hmac.new(secret, _TOKEN_CONTEXT + body.encode("ascii"), hashlib.sha256).digest()
    return _b64(digest[:_MAC_BYTES])


def survey_token(secret: bytes, conversation_id: str, message_id: str) -> str:
    """`base64url(conversation_id "." message_id) "." base64url(HMAC-SHA256)[:16 bytes]`.

    Raises ValueError for a conversation id that is not a UUID or an empty/long message id
    (Commands makes neither)."""
    conversation = str(uuid.UUID(conversation_id))  # a UUID has no ".": the first one splits
    if not message_id or len(message_id) > _MAX_MESSAGE_ID_CHARS:
        raise ValueError(f"a survey message id has 1-{_MAX_MESSAGE_ID_CHARS} characters")
    body = _b64(f"{conversation}.{message_id}".encode())
    return f"{body}.{_mac(secret, body)}"


def read_survey_token(secret: bytes, token: str) -> SurveyRef:
    """The survey a token names, or InvalidSurveyToken: never any other exception."""
    if len(token) > _MAX_TOKEN_CHARS or not _TOKEN_SHAPE.fullmatch(token):
        raise InvalidSurveyToken("not a survey token")
    body, _, mac = token.partition(".")
    # Compared as text: a differently padded or re-encoded signature is not ours either.
    if not hmac.compare_digest(_mac(secret, body).encode(), mac.encode()):
        raise InvalidSurveyToken("the survey token's signature does not match")
    try:
        text = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
        conversation, dot, message_id = text.partition(".")
        conversation = str(uuid.UUID(conversation))
    except (binascii.Error, ValueError):
        # Signed with our key but not by survey_token: a key shared with another use.
        raise InvalidSurveyToken("the survey token does not name a survey") from None
    if not dot or not message_id:
        raise InvalidSurveyToken("the survey token does not name a survey")
    return SurveyRef(conversation, message_id)


# --------------------------------------------------------------------------- answers


def parse_score(raw: object) -> int:
    """1-5 from a query parameter, a form field ("4") or JSON (4 or "4")."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw in SCORES:
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if len(text) == 1 and text in "12345":
            return int(text)
    shown = "missing" if raw is None else repr(raw)[:20]
    raise InvalidAnswer(f"score must be a whole number from 1 to 5, not {shown}")


def parse_comment(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidAnswer("comment must be text")
    text = raw.strip()
    if len(text) > MAX_COMMENT_CHARS:
        raise InvalidAnswer(f"comment is over {MAX_COMMENT_CHARS} characters")
    return text or None


def survey_event(
    survey: SurveyRef, *, email: str, score: int, comment: str | None, now: datetime
) -> ContactEvent:
    """One survey answer as a `csat.submitted` contact event; InvalidContactEvent when the
    customer's email address is not one."""
    event = ContactEvent(
        event_id=survey.event_id,
        occurred_at=now,
        channel=EMAIL,
        type="csat.submitted",
        customer=CustomerRef(email=email),
        # The conversation's thread token: ingest records the answer on the surveyed
        # conversation even when the customer has opened a newer one since.
        thread=ThreadRef(ref=conversation_token(survey.conversation_id)),
        payload={
            "score": score,
            "comment": comment,
            "conversation": survey.conversation_id,
            "survey": survey.message_id,
        },
    )
    return validate(without_nul(event), now=now)


# --------------------------------------------------------------------------- the service


class Surveys:
    """Survey texts for `Commands(survey_text=surveys.text)` and the `/csat/{token}` routes.

    `secret` signs the email links: keep it across restarts and processes, or links already
    sent stop working. `publisher` None (no Kafka in this process) answers 503.
    """

    def __init__(
        self,
        *,
        public_url: str,
        secret: bytes,
        publisher: Publisher | None,
        customer_email: CustomerEmail,
        clock: Clock = system_clock,
    ) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"the survey secret needs at least {_MIN_SECRET_BYTES} bytes")
        self._base = public_url.rstrip("/")
        self._secret = secret
        self._publisher = publisher
        self._customer_email = customer_email
        self._clock = clock

    # -- texts ----------------------------------------------------------------------------

    def text(self, channel: str, conversation_id: str, message_id: str) -> str | None:
        """The survey to send on `channel`; None where there is none (voice, unknown)."""
        if channel in TEXT_CHANNELS:
            return TEXT_QUESTION
        if channel == EMAIL:
            return self._email_text(survey_token(self._secret, conversation_id, message_id))
        return None

    def link(self, token: str, score: int) -> str:
        return f"{self._base}/csat/{token}?score={score}"

    def _email_text(self, token: str) -> str:
        choices = "\n".join(f"{n} ({SCORE_LABELS[n]}): {self.link(token, n)}" for n in SCORES)
        return (
            "How did we do? One click tells us, from 1 (poor) to 5 (excellent):\n\n"
            f"{choices}\n\nThank you for your time."
        )

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """`GET /csat/{token}` (the choices, or an answer with `?score=N`) and
        `POST /csat/{token}` (form or JSON: score, comment)."""
        return [
            Route(PATH, self._get, methods=["GET"]),  # HEAD comes with GET: it never answers
            Route(PATH, self._post, methods=["POST"]),
        ]

    async def _get(self, request: Request) -> Response:
        try:
            survey = read_survey_token(self._secret, request.path_params["token"])
        except InvalidSurveyToken as exc:
            return _forged(request, exc)
        # HEAD is what link checkers and mail scanners send: it must not answer for anyone.
        if "score" not in request.query_params or request.method == "HEAD":
            return _page(200, "How did we do?", _choices_html(request.path_params["token"]))
        try:
            score = parse_score(request.query_params["score"])
        except InvalidAnswer as exc:
            return _refused(request, 422, "invalid_answer", str(exc))
        return await self._submit(request, survey, score, None)

    async def _post(self, request: Request) -> Response:
        try:
            survey = read_survey_token(self._secret, request.path_params["token"])
        except InvalidSurveyToken as exc:
            return _forged(request, exc)
        try:
            fields = await _answer_fields(request)
        except _BadBody as exc:
            return _refused(request, exc.status, "bad_request", str(exc))
        try:
            score = parse_score(fields.get("score"))
            comment = parse_comment(fields.get("comment"))
        except InvalidAnswer as exc:
            return _refused(request, 422, "invalid_answer", str(exc))
        return await self._submit(request, survey, score, comment)

    async def _submit(
        self, request: Request, survey: SurveyRef, score: int, comment: str | None
    ) -> Response:
        email = await self._customer_email(survey.conversation_id)
        if email is None:
            return _refused(request, 404, "not_found", "we could not find this survey")
        try:
            event = survey_event(
                survey, email=email, score=score, comment=comment, now=self._clock()
            )
        except InvalidContactEvent as exc:
            log.warning("survey of conversation %s not published: %s", survey.conversation_id, exc)
            return _refused(request, 404, "not_found", "we could not find this survey")
        if self._publisher is None:
            return _try_again(request)
        try:
            await self._publisher.publish(event)
        except PublishFailed:
            return _try_again(request)
        if _wants_json(request):
            return JSONResponse({"event_id": event.event_id, "score": score}, headers=_HEADERS)
        return _page(200, "Thank you", "<p>Thank you for your answer.</p>")


# --------------------------------------------------------------------------- request bodies


class _BadBody(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _answer_fields(request: Request) -> Mapping[str, object]:
    """score and comment from a form (urlencoded or multipart) or a JSON object."""
    body = await _read_body(request)
    kind = _content_type(request)
    if kind == "application/json":
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _BadBody(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise _BadBody(400, "the body must be a JSON object")
        return data
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return await _form_fields(request, body)
    raise _BadBody(415, "send a form or JSON")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > MAX_BODY_BYTES:
        raise _BadBody(413, f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # chunked bodies have no Content-Length to check first
            raise _BadBody(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_fields(request: Request, body: bytes) -> dict[str, object]:
    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form: FormData = await Request(request.scope, replay).form(max_files=0, max_fields=20)
    except (MultiPartException, HTTPException) as exc:
        raise _BadBody(400, f"the form cannot be read: {getattr(exc, 'detail', exc)}") from None
    # The first value of each field; file parts are refused by max_files=0.
    fields: dict[str, object] = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields.setdefault(name, value)
    return fields


# --------------------------------------------------------------------------- answers


# The token is the credential: keep it out of caches, Referer headers and search engines.
_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}
_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem}"
    "ol{list-style:none;padding:0;display:flex;gap:.5rem}"
    "ol a{display:block;padding:.6rem .9rem;border:1px solid #888;border-radius:.4rem;"
    "text-decoration:none}textarea{width:100%;min-height:6rem}"
)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return _content_type(request) == "application/json" or accept.startswith("application/json")


def _page(status: int, title: str, body: str) -> HTMLResponse:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status, headers=_HEADERS)


def _choices_html(token: str) -> str:
    # Relative links: they resolve against /csat/{token} wherever the routes are mounted.
    here = html.escape(token)
    links = "".join(
        f'<li><a href="{here}?score={n}" title="{SCORE_LABELS[n]}">{n}</a></li>' for n in SCORES
    )
    radios = "".join(
        f'<label><input type="radio" name="score" value="{n}" required> {n}</label> '
        for n in SCORES
    )
    return (
        "<p>Choose from 1 (poor) to 5 (excellent):</p>"
        f"<ol>{links}</ol>"
        f'<form method="post" action="{here}"><p>Or rate and tell us more:</p><p>{radios}</p>'
        f'<p><textarea name="comment" maxlength="{MAX_COMMENT_CHARS}" '
        'aria-label="Comment (optional)" placeholder="Comment (optional)"></textarea></p>'
        '<p><button type="submit">Send</button></p></form>'
    )


def _refused(request: Request, status: int, code: str, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=_HEADERS
        )
    return _page(status, "Sorry", f"<p>{html.escape(message)}</p>")


def _forged(request: Request, exc: InvalidSurveyToken) -> Response:
    log.info("refused a survey answer: %s", exc)
    return _refused(request, 403, "invalid_token", "this survey link is not valid")


def _try_again(request: Request) -> Response:
    response = _refused(
        request, 503, "try_again", "we could not record your answer just now; please try again"
    )
    response.headers["Retry-After"] = "30"
    return response
