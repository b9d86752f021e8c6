"""One received mail → one contact event (CONTRACT.md), with the standard library's `email`.

Pure functions, no I/O: `parse_email` reads the raw bytes of one SMTP transaction into a
`ParsedEmail`; `to_contact_event` turns that into the `message.received` event. Attachment bytes
come back in the `ParsedEmail` for the caller to store (adapters/attachments.py); the event
only carries their content refs. Anything a sender can put in a mail gives a `ParsedEmail` or an
`InvalidEmail` with the reason, which the SMTP server sends back.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.errors import MessageError
from email.header import decode_header, make_header
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

import msgspec

from adapters.attachments import content_ref
from inbox import thread_tokens
from inbox.contact import (
    MAX_RECORD_BYTES,
    ContactEvent,
    CustomerRef,
    InvalidContactEvent,
    ThreadRef,
    encode_contact_event,
    validate,
)
from inbox.identity import InvalidIdentity, normalise_email

# Text beyond these sizes stays in the raw mail only: a contact event must fit in one Kafka
# record (1 MiB), with room for JSON escapes.
MAX_TEXT_CHARS = 100_000
MAX_HTML_CHARS = 200_000
MAX_SUBJECT_CHARS = 998
MAX_THREAD_IDS = 50
MAX_PARTS = 500  # a mail of thousands of empty parts costs time and brings nothing

_MESSAGE_ID = re.compile(r"<([^<>\s\x00-\x1f\x7f]{1,500})>")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_HEADER_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_AUTOMATIC_SENDERS = frozenset({"mailer-daemon", "postmaster"})
_BULK_PRECEDENCE = frozenset({"bulk", "auto_reply", "junk"})

# Parsing a header the way policy.default does can raise on malformed input (bugs in
# email._header_value_parser); such a header is then read raw instead.
_HEADER_ERRORS = (
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    LookupError,
    AssertionError,
    MessageError,
)


class InvalidEmail(ValueError):
    """Why a mail cannot become a contact event; the SMTP server answers 550 with it."""


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    data: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def ref(self) -> str:
        return content_ref(self.data)


@dataclass(frozen=True)
class ParsedEmail:
    sender: str  # the From address, normalised (the customer's identity)
    sender_name: str | None
    subject: str
    text: str  # the whole text, quoted history and signature included
    new_text: str  # what the sender wrote this time: text without quotes and signature
    html: str | None
    attachments: tuple[Attachment, ...]
    message_id: str | None  # "<id@host>" as the sender set it
    in_reply_to: tuple[str, ...]  # In-Reply-To, then References newest first
    thread_token: str | None  # our conversation token, from a recipient address or subject
    date: datetime | None
    auto_submitted: bool
    recipients: tuple[str, ...]
    digest: str  # sha256 of the raw bytes: the event id of a mail without a Message-ID
    truncated: bool = False


# --------------------------------------------------------------------------- parsing


def parse_email(raw: bytes, *, envelope_from: str | None, recipients: list[str]) -> ParsedEmail:
    """Reads one mail; raises InvalidEmail when it cannot be attributed to a sender."""
    if not isinstance(raw, bytes | bytearray):
        raise InvalidEmail("the mail is not bytes")
    raw = bytes(raw)
    if not raw.strip():
        raise InvalidEmail("the mail is empty")
    msg = _parse(raw)
    sender, sender_name = _sender(msg)
    subject = _clean_header(_header(msg, "Subject") or "")[:MAX_SUBJECT_CHARS]
    body = _Body()
    _collect(msg, body, depth=0)
    html = body.html
    text = body.plain if body.plain is not None else (html_to_text(html) if html else "")
    text = _clean_text(text)
    truncated = len(text) > MAX_TEXT_CHARS or (html is not None and len(html) > MAX_HTML_CHARS)
    text = text[:MAX_TEXT_CHARS]
    if html is not None:
        html = _clean_text(html)[:MAX_HTML_CHARS]
    ours = tuple(_clean_header(r).strip() for r in recipients)
    return ParsedEmail(
        sender=sender,
        sender_name=sender_name,
        subject=subject,
        text=text,
        new_text=new_text_of(text),
        html=html,
        attachments=tuple(body.attachments),
        message_id=_first_message_id(_raw_header(msg, "Message-ID")),
        in_reply_to=_thread_ids(msg),
        thread_token=_thread_token(ours, subject),
        date=_date(msg),
        auto_submitted=_is_automatic(msg, sender, envelope_from),
        recipients=ours,
        digest=hashlib.sha256(raw).hexdigest(),
        truncated=truncated,
    )


class _HeaderClasses(HeaderRegistry):
    """policy.default's header factory builds a new class (an ABCMeta one) for every header it
    parses, ~40 µs each, three or more per mail; the class for a name is always the same."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        found = self._classes.get(key)
        if found is None:
            found = self._classes[key] = super().__getitem__(name)
        return found


# policy.default, parsing exactly as it does, without a class built per header.
_POLICY = policy.default.clone(header_factory=_HeaderClasses())

_MISSING = object()


class _CachingMessage(EmailMessage):
    """policy.default parses a header again at every read, and one part's Content-Type is read
    five times (type, charset, name, ...); parsed headers are kept until a header changes."""

    _header_cache: dict[str, Any]

    def get(self, name: str, failobj: Any = None) -> Any:
        cache = self.__dict__.setdefault("_header_cache", {})
        key = name.lower()
        value = cache.get(key, _MISSING)
        if value is _MISSING:
            value = cache[key] = super().get(name, _MISSING)
        return failobj if value is _MISSING else value

    def set_raw(self, name: str, value: Any) -> None:
        self.__dict__.pop("_header_cache", None)
        super().set_raw(name, value)

    def __setitem__(self, name: str, val: Any) -> None:
        self.__dict__.pop("_header_cache", None)
        super().__setitem__(name, val)

    def __delitem__(self, name: str) -> None:
        self.__dict__.pop("_header_cache", None)
        super().__delitem__(name)


_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


def _parse_single_part(raw: bytes) -> Message | None:
    """A one-part mail without the feed parser's walk over every body line: the headers are
    parsed alone and the body set as the payload, as the full parse would. None when the mail
    has parts, or headers the quick split would misread."""
    end = _END_OF_HEADERS.search(raw)
    if end is None or end.start() == 0 or raw[:1] in (b"\r", b"\n"):
        return None
    head = raw[: end.end()]
    if head.count(b"\r") != head.count(b"\r\n"):
        return None  # a bare CR ends a line for the feed parser: let it decide
    msg = BytesParser(_CachingMessage, policy=_POLICY).parsebytes(head, headersonly=True)
    if msg.defects or msg.get_content_maintype() in ("multipart", "message"):
        return None
    msg.set_payload(raw[end.end() :].decode("ascii", "surrogateescape"))
    return msg


def _parse(raw: bytes) -> Message:
    try:
        return _parse_single_part(raw) or BytesParser(_CachingMessage, policy=_POLICY).parsebytes(
            raw
        )
    except _HEADER_ERRORS:
        # policy.default parses some headers while reading (Content-Type) and can trip over
        # malformed ones; compat32 keeps them as raw strings, which the helpers below handle.
        pass
    try:
        return BytesParser(policy=policy.compat32).parsebytes(raw)
    except (*_HEADER_ERRORS, UnicodeError) as exc:
        raise InvalidEmail(f"the mail cannot be parsed: {type(exc).__name__}") from None


def to_contact_event(parsed: ParsedEmail, *, now: datetime | None = None) -> ContactEvent:
    """The `message.received` contact event of a parsed mail (validated)."""
    at_now = now or datetime.now(UTC)
    occurred = parsed.date
    # A missing, impossible or future Date (beyond the gate's day of clock skew) says
    # nothing reliable: the mail arrived now.
    if occurred is None or occurred.year < 2000 or occurred > at_now + timedelta(days=1):
        occurred = at_now
    event_id = parsed.message_id or f"sha256:{parsed.digest}"
    payload: dict[str, Any] = {
        "text": parsed.text,
        "new_text": parsed.new_text,
        "subject": parsed.subject,
        "message_id": parsed.message_id,
        "attachments": [
            {"name": a.name, "type": a.content_type, "size": a.size, "ref": a.ref}
            for a in parsed.attachments
        ],
        "to": list(parsed.recipients),
        # The address of ours the customer wrote to: replies leave from it (OutboundMessage.via).
        "via": _our_address(parsed.recipients),
        "auto_submitted": parsed.auto_submitted,
    }
    if parsed.html:
        payload["html"] = parsed.html
    if parsed.truncated:
        payload["truncated"] = True
    if not parsed.text.strip() and not parsed.subject.strip() and not parsed.attachments:
        raise InvalidEmail("the mail has no text, no subject and no attachments")
    event = ContactEvent(
        event_id=event_id,
        occurred_at=occurred,
        channel="email",
        type="message.received",
        customer=CustomerRef(email=parsed.sender, name=parsed.sender_name),
        thread=ThreadRef(ref=parsed.thread_token, in_reply_to=parsed.in_reply_to),
        payload=payload,
    )
    try:
        event = validate(event, now=at_now)
    except InvalidContactEvent as exc:
        raise InvalidEmail(str(exc)) from None
    return _fit_record(event)


def _our_address(recipients: tuple[str, ...]) -> str | None:
    """The first recipient, lower case, without a reply token (`support+TOKEN@` → `support@`)."""
    for recipient in recipients:
        local, at, domain = recipient.strip().strip("<>").lower().rpartition("@")
        if at and local and domain:
            return f"{local.partition('+')[0] or local}@{domain}"
    return None


def _fit_record(event: ContactEvent) -> ContactEvent:
    """Shrinks text until the event fits one Kafka record (escapes can make JSON 6x longer)."""
    while len(encode_contact_event(event)) > MAX_RECORD_BYTES - 4096:
        payload = dict(event.payload)
        payload["truncated"] = True
        if payload.pop("html", None) is None:
            limit = max(len(payload["text"]) // 2, 0)
            payload["text"] = payload["text"][:limit]
            payload["new_text"] = payload["new_text"][:limit]
            if limit == 0:
                payload["attachments"] = payload["attachments"][:100]
                payload["to"] = payload["to"][:10]
                if len(encode_contact_event(msgspec.structs.replace(event, payload=payload))) > (
                    MAX_RECORD_BYTES - 4096
                ):
                    raise InvalidEmail("the mail's headers are too large for one contact event")
        event = msgspec.structs.replace(event, payload=payload)
    return event


# --------------------------------------------------------------------------- headers


def _header(msg: Message, name: str) -> str | None:
    """The decoded value of the first header `name`, or None."""
    try:
        value = msg.get(name)
        if value is None:
            return None
        if type(value) is str:  # a compat32 message: encoded words not decoded yet
            return _decode_raw(value)
        return str(value)
    except _HEADER_ERRORS:
        raw = _raw_header(msg, name)
        return None if raw is None else _decode_raw(raw)


def _raw_header(msg: Message, name: str) -> str | None:
    wanted = name.lower()
    for key, value in msg.raw_items():
        if key.lower() == wanted:
            return str(value)
    return None


def _decode_raw(value: str) -> str:
    """RFC 2047 decoding without policy.default's parser, for headers that break it."""
    try:
        return str(make_header(decode_header(value)))
    except (*_HEADER_ERRORS, UnicodeError):
        return value


def _clean_header(value: str) -> str:
    """One line of valid Unicode: 8-bit bytes read as UTF-8, control characters dropped."""
    return " ".join(_HEADER_CONTROL.sub(" ", _valid_unicode(value)).split())


def _valid_unicode(value: str) -> str:
    """Undoes the parser's surrogate escapes (raw 8-bit bytes), so the text encodes as UTF-8."""
    if value.isascii():  # nothing escaped (isascii is a flag lookup)
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = value.encode("utf-8", "replace")
    return data.decode("utf-8", "replace")


def _clean_text(value: str) -> str:
    text = _valid_unicode(value).replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        # The same characters dropped as bytes: ~6x faster than the regex on a 20 KB text.
        return text.encode("ascii").translate(None, _CONTROL_BYTES).decode("ascii")
    return _CONTROL.sub("", text)


def _sender(msg: Message) -> tuple[str, str | None]:
    for name in ("From", "Sender"):
        found = _address(msg, name)
        if found is not None:
            address, display = found
            try:
                address = _valid_unicode(address)
                if "\ufffd" in address:  # bytes that are not UTF-8: not an address
                    raise InvalidIdentity(address)
                email = normalise_email(address)
            except InvalidIdentity:
                raise InvalidEmail(
                    f"the {name} address {_clean_header(address)[:80]!r} is not valid"
                ) from None
            display = _clean_header(display or "").strip(" \"'")[:200]
            return email, display or None
    raise InvalidEmail("the mail has no From address")


# The common forms of an address header: `Name <a@b>`, `"Name" <a@b>`, `a@b`. Read with a
# regex; anything else (groups, comments, several addresses) goes to policy.default's parser.
_SIMPLE_ADDRESS = re.compile(
    r'^\s*(?:"([^"\\<>]*)"|([^",;:<>()\\@\[\]]*?))?\s*<([^<>@\s",;:()]+@[^<>@\s",;:()]+)>\s*$'
    r'|^\s*([^<>@\s",;:()]+@[^<>@\s",;:()]+)\s*$'
)


def _address(msg: Message, name: str) -> tuple[str, str] | None:
    raw = _raw_header(msg, name)
    simple = _SIMPLE_ADDRESS.match(raw) if raw is not None and raw.isascii() else None
    if simple is not None:
        quoted, plain, address, bare = simple.groups()
        display = quoted if quoted is not None else plain or ""
        return (bare or address), _decode_raw(display)
    try:
        header: Any = msg.get(name)
        if header is None:
            return None
        addresses = getattr(header, "addresses", ())
        for address in addresses:
            if address.addr_spec and "@" in address.addr_spec:
                return str(address.addr_spec), str(address.display_name or "")
    except _HEADER_ERRORS:
        pass
    raw = _raw_header(msg, name)
    if raw is None:
        return None
    for display, address in getaddresses([_valid_unicode(raw)]):
        if "@" in address:
            return address, _decode_raw(display)
    display, address = parseaddr(_valid_unicode(raw))
    return (address, _decode_raw(display)) if "@" in address else None


def _message_ids(value: str | None) -> list[str]:
    if not value:
        return []
    return [f"<{m}>" for m in _MESSAGE_ID.findall(_valid_unicode(value))]


def _first_message_id(value: str | None) -> str | None:
    ids = _message_ids(value)
    return ids[0] if ids else None


def _thread_ids(msg: Message) -> tuple[str, ...]:
    """In-Reply-To first, then References newest first (References lists oldest first)."""
    # Message ids are matched in the raw values: they are never encoded, and parsing them as
    # policy.default does costs more than all the rest of a mail's headers.
    ids = _message_ids(_raw_header(msg, "In-Reply-To"))
    ids += reversed(_message_ids(_raw_header(msg, "References")))
    return tuple(dict.fromkeys(ids))[:MAX_THREAD_IDS]


def _thread_token(recipients: tuple[str, ...], subject: str) -> str | None:
    for recipient in recipients:
        found = thread_tokens.from_address(recipient)
        if found is not None:
            return thread_tokens.conversation_token(found)
    found = thread_tokens.from_subject(subject)
    return None if found is None else thread_tokens.conversation_token(found)


def _date(msg: Message) -> datetime | None:
    raw = _raw_header(msg, "Date")
    if raw is None:
        return None
    try:
        value = parsedate_to_datetime(_valid_unicode(raw).strip())
    except (*_HEADER_ERRORS, OverflowError):
        return None
    if value.tzinfo is None:  # "-0000": the time is UTC, its zone unknown (RFC 5322 3.3)
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _is_automatic(msg: Message, sender: str, envelope_from: str | None) -> bool:
    """Auto-replies, bounces and other reports: recorded, but they are nobody writing to us."""
    auto = (_raw_header(msg, "Auto-Submitted") or "").split(";")[0].strip().lower()
    if auto and auto != "no":
        return True
    if (_raw_header(msg, "Precedence") or "").strip().lower() in _BULK_PRECEDENCE:
        return True
    if _raw_header(msg, "X-Autoreply") is not None or _raw_header(msg, "X-Autorespond") is not None:
        return True
    if msg.get_content_type() == "multipart/report":
        return True  # delivery-status (bounces) and disposition-notification (read receipts)
    if sender.partition("@")[0] in _AUTOMATIC_SENDERS:
        return True
    # The null reverse-path (MAIL FROM:<>) is what RFC 3834 and RFC 5321 prescribe for
    # automatic messages, so they cannot loop.
    return envelope_from is not None and envelope_from.strip() in ("", "<>")


# --------------------------------------------------------------------------- bodies


@dataclass
class _Body:
    plain: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    parts: int = 0


def _collect(part: Message, body: _Body, depth: int) -> None:
    body.parts += 1
    if body.parts > MAX_PARTS or depth > 30:
        return
    # Raw 8-bit bytes in a Content-Type would make the type unencodable text.
    ctype = _clean_header(part.get_content_type())
    maintype = ctype.partition("/")[0]
    if part.is_multipart() and maintype == "message":
        # A forwarded or bounced mail: kept whole, as the .eml it is.
        inner = part.get_payload()
        data = b""
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            data = _as_bytes(inner[0])
        body.attachments.append(
            Attachment(_attachment_name(part, ctype, len(body.attachments)), ctype, data)
        )
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    _collect(sub, body, depth + 1)
        return
    disposition = _disposition(part)
    filename = _filename(part)
    if disposition != "attachment" and filename is None and ctype in ("text/plain", "text/html"):
        text = decode_text(_payload_bytes(part), part.get_content_charset())
        if ctype == "text/plain":
            # Further inline text parts (a body split around an inline image, a list footer)
            # belong to the text too.
            body.plain = text if body.plain is None else body.plain + "\n" + text
        elif body.html is None:
            body.html = text
        return
    if maintype == "text" and disposition != "attachment" and filename is None:
        # Another inline text type (text/enriched, text/calendar without a name): shown as text.
        text = decode_text(_payload_bytes(part), part.get_content_charset())
        if ctype != "text/calendar" and body.plain is None:
            body.plain = text
            return
    data = _payload_bytes(part)
    name = filename or _attachment_name(part, ctype, len(body.attachments))
    body.attachments.append(Attachment(name, ctype, data))


def _as_bytes(msg: Message) -> bytes:
    try:
        return msg.as_bytes(policy=policy.compat32)
    except (*_HEADER_ERRORS, UnicodeError):
        return b""


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except _HEADER_ERRORS:
        return None


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except (*_HEADER_ERRORS, UnicodeError):
        return None
    if not name:
        return None
    # A name is a label, never a path: keep the last component, printable, bounded.
    name = _clean_header(str(name)).replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:255] or None


def _attachment_name(part: Message, ctype: str, index: int) -> str:
    extension = ".eml" if ctype == "message/rfc822" else mimetypes.guess_extension(ctype) or ""
    return f"attachment-{index + 1}{extension}"


def _payload_bytes(part: Message) -> bytes:
    """The decoded bytes of a leaf part (base64 or quoted-printable undone)."""
    try:
        data = part.get_payload(decode=True)
    except (*_HEADER_ERRORS, UnicodeError):
        data = None
    if isinstance(data, bytes):
        return data
    try:
        raw = part.get_payload()
    except (*_HEADER_ERRORS, UnicodeError):
        return b""
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def decode_text(data: bytes, charset: str | None) -> str:
    """Bytes of a text part as text: its declared charset, else UTF-8; never an exception."""
    if charset:
        try:
            return data.decode(charset.strip().strip("\"'"), "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass  # an unknown or non-text codec ("rot13", "base64"): fall back below
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- HTML


_SKIPPED_TAGS = frozenset({"script", "style", "title", "template", "head"})
_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "dd",
        "div",
        "dl",
        "dt",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tr",
        "ul",
    }
)
_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"})


class _TextExtractor(HTMLParser):
    """Visible text of an HTML body, one line per block; blockquotes become "> " lines so the
    quoted history is recognised like in a plain-text mail."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._words: list[str] = []
        self._skip = 0
        self._quote = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip += 1
        elif tag == "br":
            self._line_break()
        elif tag in _BLOCK_TAGS:
            self._block(tag)
            if tag == "blockquote":
                self._quote += 1
            elif tag == "li":
                self._words.append("- ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _SKIPPED_TAGS:  # <script/> opens nothing
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip = max(self._skip - 1, 0)
        elif tag in _BLOCK_TAGS:
            self._block(tag)
            if tag == "blockquote":
                self._quote = max(self._quote - 1, 0)
        elif tag in ("td", "th"):
            self._words.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._words.append(data)

    def _flush(self) -> bool:
        line = " ".join("".join(self._words).split())
        self._words = []
        if not line:
            return False
        self.lines.append("> " * self._quote + line)
        return True

    def _line_break(self) -> None:
        if not self._flush() and self.lines and self.lines[-1]:
            self.lines.append(">" * self._quote if self._quote else "")

    def _block(self, tag: str) -> None:
        self._flush()
        if tag in _PARAGRAPH_TAGS and self.lines and self.lines[-1].strip("> "):
            self.lines.append("")

    def text(self) -> str:
        self._flush()
        return "\n".join(self.lines).strip()


def html_to_text(html: str) -> str:
    extractor = _TextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
    except AssertionError:
        pass  # _markupbase gives up on some malformed declarations: keep what was read
    return extractor.text()


# --------------------------------------------------------------------------- quotes


_ATTRIBUTION = re.compile(
    r"^(On\b.*\bwrote|Le\b.*\ba écrit|Am\b.*\bschrieb|El\b.*\bescribió|Em\b.*\bescreveu|"
    r"Il\b.*\bha scritto|Op\b.*\bschreef)\s*:\s*$",
    re.IGNORECASE,
)
_ORIGINAL = re.compile(
    r"^(-{2,}\s*(Original Message|Ursprüngliche Nachricht|Message d'origine|Mensagem original|"
    r"Mensaje original)\s*-{2,}|_{20,})$",
    re.IGNORECASE,
)
_ATTRIBUTION_STARTS = frozenset({"on ", "le ", "am ", "el ", "em ", "il ", "op "})
# The lines new_text_of looks at closely; text before the first of them is all new.
_CANDIDATE_LINE = re.compile(
    r"[ \t]*(>|-|_|(on|le|am|el|em|il|op) |(from|de|von|van|da):)", re.IGNORECASE
)
_CANDIDATE_START = re.compile(r"\n[ \t]*[>\-_oOlLaAeEiIfFdDvV]")
_OUTLOOK_HEADER = re.compile(r"^(From|De|Von|Van|Da):\s", re.IGNORECASE)
_OUTLOOK_NEXT = re.compile(r"^(Sent|Date|Envoyé|Gesendet|Enviado|Verzonden|Inviato):\s", re.I)


def new_text_of(text: str) -> str:
    """What the sender wrote this time: the text without quoted lines (">"), their
    "On ... wrote:" attribution, and whatever follows a signature separator ("-- ") or an
    "Original Message" block. The full text stays in the payload; this is what to show first."""
    start = _first_candidate(text)
    if start is None:  # no line looks like a quote, an attribution or a signature
        return _collapse_blank_lines(text.strip())
    lines = text[start:].split("\n")
    kept: list[str] = [text[:start].removesuffix("\n")]
    index = 0
    # Cheap first-character tests decide which lines deserve a regex (long mails, many lines).
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        index += 1
        if not stripped:
            kept.append(line)
            continue
        first = stripped[0]
        if first == ">":
            continue
        if first in "-_" and (line.rstrip() == "--" or _ORIGINAL.match(stripped)):
            break
        following = lines[index].strip() if index < len(lines) else ""
        if (
            ":" in stripped[:8]
            and _OUTLOOK_HEADER.match(stripped)
            and _OUTLOOK_NEXT.match(following)
        ):
            break
        if stripped[:3].lower() in _ATTRIBUTION_STARTS:
            if _ATTRIBUTION.match(stripped):
                continue
            # An attribution wrapped over two lines ("On ..., Name <" / "a@b> wrote:").
            if following and _ATTRIBUTION.match(stripped + " " + following):
                index += 1
                continue
        kept.append(line)
    new = _collapse_blank_lines("\n".join(kept).strip())
    return new or text.strip()


def _first_candidate(text: str) -> int | None:
    """Where the first line that new_text_of must look at closely starts."""
    if _CANDIDATE_LINE.match(text):
        return 0
    # A cheap scan for a plausible first character, then the real test at that line.
    for found in _CANDIDATE_START.finditer(text):
        if _CANDIDATE_LINE.match(text, found.start() + 1):
            return found.start() + 1
    return None


def _collapse_blank_lines(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text) if "\n\n\n" in text else text
