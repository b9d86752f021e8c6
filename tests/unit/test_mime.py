"""adapters/mime.py and adapters/attachments.py: mails in the real formats, and fuzzing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.attachments import AttachmentStore, UnknownAttachment, content_ref
from adapters.email_out import SmtpSender, reply_subject
from adapters.mime import (
    InvalidEmail,
    ParsedEmail,
    _parse_single_part,
    html_to_text,
    new_text_of,
    parse_email,
    to_contact_event,
)
from adapters.outbound import OutboundMessage
from inbox import thread_tokens
from inbox.contact import encode_contact_event, parse_contact_event

SAMPLES = Path(__file__).parent.parent / "samples" / "email"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
OURS = ["support@example.com"]


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def parse(raw: bytes, recipients: list[str] | None = None) -> ParsedEmail:
    return parse_email(raw, envelope_from="sender@customer.test", recipients=recipients or OURS)


def test_plain_mail_becomes_a_message_received_event() -> None:
    event = to_contact_event(parse(sample("plain.eml")), now=NOW)
    assert event.type == "message.received"
    assert event.channel == "email"
    assert event.event_id == "<CAF3x9k2Lq=ab12cd34ef@mail.customer.test>"
    assert event.customer.email == "alice@customer.test"  # normalised from Alice@Customer.test
    assert event.customer.name == "Alice Moreau"
    assert event.key == "email:alice@customer.test"
    assert event.occurred_at == datetime(2026, 11, 27, 8, 12, 44, tzinfo=UTC)
    assert event.payload["subject"] == "Order 4412 not delivered"
    assert event.payload["text"].startswith("Hello,\n\nmy order 4412")
    assert event.payload["message_id"] == event.event_id
    assert event.payload["attachments"] == []
    assert event.payload["auto_submitted"] is False
    assert "html" not in event.payload
    # What goes to Kafka passes the ingest worker's gate unchanged.
    assert parse_contact_event(encode_contact_event(event), now=NOW) == event


def test_multipart_with_attachment_and_encoded_subject() -> None:
    parsed = parse(sample("multipart-attachment.eml"))
    event = to_contact_event(parsed, now=NOW)
    assert event.payload["subject"] == "Fatura não confere"
    assert event.payload["text"].strip() == "Olá, a fatura em anexo não confere com o pedido."
    assert "<b>não confere</b>" in event.payload["html"]
    [attachment] = parsed.attachments
    assert attachment.data.startswith(b"%PDF-1.4")
    assert event.payload["attachments"] == [
        {
            "name": "fatura.pdf",
            "type": "application/pdf",
            "size": len(attachment.data),
            "ref": content_ref(attachment.data),
        }
    ]


@pytest.mark.parametrize(
    ("name", "sender_name", "subject", "text", "new_text"),
    [
        (
            "shift-jis.eml",
            "山田 太郎",
            "注文について",
            "お世話になっております。\n注文番号 4412 の商品がまだ届いていません。\n"
            "\n-- \n山田太郎\n",
            "お世話になっております。\n注文番号 4412 の商品がまだ届いていません。",
        ),
        (
            "latin1.eml",
            "François Léger",
            "Problème de livraison",
            "Bonjour, le colis n'est pas arrivé. Merci d'avance.\n\n"
            "Le ven. 27 nov. 2026 à 08:00, Support a écrit :\n> Nous vérifions.\n",
            "Bonjour, le colis n'est pas arrivé. Merci d'avance.",
        ),
    ],
)
def test_non_utf8_bodies_and_encoded_headers(
    name: str, sender_name: str, subject: str, text: str, new_text: str
) -> None:
    parsed = parse(sample(name))
    assert parsed.sender_name == sender_name
    assert parsed.subject == subject
    assert parsed.text == text
    assert parsed.new_text == new_text


def test_unknown_charsets_fall_back_with_replacement() -> None:
    parsed = parse(sample("bad-charset.eml"))
    assert parsed.text.startswith("caf\ufffd au lait")
    assert parsed.subject.startswith("caf")
    to_contact_event(parsed, now=NOW)


def test_html_only_mail_gets_text_extracted() -> None:
    parsed = parse(sample("html-only.eml"))
    assert parsed.text == (
        "Hello team,\n\nthe parcel is damaged.\nPhoto follows.\n\n"
        "> On Thursday you wrote:\n> We shipped it."
    )
    assert parsed.new_text == "Hello team,\n\nthe parcel is damaged.\nPhoto follows."
    assert parsed.html is not None
    assert "<blockquote>" in parsed.html
    assert "ignored title" not in parsed.text
    assert "alert" not in parsed.text


def test_html_to_text_keeps_text_not_markup() -> None:
    assert html_to_text("<p>a &lt; b &amp; c</p><ul><li>one</li><li>two</li></ul>") == (
        "a < b & c\n\n- one\n- two"
    )
    assert html_to_text("<div>x<script>var y = '<p>no</p>';</script>z</div>") == "xz"
    assert html_to_text("<![if !supportLists]>kept<![endif]>") == "kept"


def test_reply_threads_by_in_reply_to_then_references_newest_first() -> None:
    event = to_contact_event(parse(sample("reply.eml")), now=NOW)
    assert event.thread.in_reply_to == (
        "<reply-1.conversation@example.com>",
        "<CAF3x9k2Lq=ab12cd34ef@mail.customer.test>",
    )
    assert event.payload["new_text"] == "Thanks, it arrived this morning."
    assert "> We are checking with the carrier." in event.payload["text"]


def test_conversation_token_from_recipient_address_or_subject() -> None:
    conversation = uuid.uuid4()
    token = thread_tokens.conversation_token(conversation)
    address = thread_tokens.reply_address("support", conversation, "example.com")
    by_address = parse(sample("plain.eml"), recipients=[address])
    assert by_address.thread_token == token
    assert to_contact_event(by_address, now=NOW).payload["via"] == "support@example.com"
    assert to_contact_event(by_address, now=NOW).thread.ref == token

    tagged = sample("plain.eml").replace(
        b"Subject: Order 4412 not delivered",
        b"Subject: Re: Order 4412 not delivered "
        + thread_tokens.subject_tag(conversation).encode(),
    )
    assert parse(tagged).thread_token == token
    assert parse(sample("plain.eml")).thread_token is None


@pytest.mark.parametrize(
    "header",
    [
        b"Auto-Submitted: auto-replied",
        b"Auto-Submitted: auto-generated; owner-email=x@y.test",
        b"Precedence: bulk",
        b"Precedence: auto_reply",
        b"Precedence: junk",
        b"X-Autoreply: yes",
        b"X-Autorespond: Thank you",
    ],
)
def test_auto_replies_are_marked(header: bytes) -> None:
    raw = sample("plain.eml").replace(b"MIME-Version: 1.0", header + b"\nMIME-Version: 1.0")
    event = to_contact_event(parse(raw), now=NOW)
    assert event.payload["auto_submitted"] is True


def test_auto_submitted_no_is_a_person_writing() -> None:
    raw = sample("plain.eml").replace(
        b"MIME-Version: 1.0", b"Auto-Submitted: no\nMIME-Version: 1.0"
    )
    assert parse(raw).auto_submitted is False


def test_sample_auto_reply_and_bounce_are_marked() -> None:
    assert parse(sample("auto-reply.eml")).auto_submitted is True
    bounce = parse(sample("bounce.eml"))
    assert bounce.auto_submitted is True
    assert [a.content_type for a in bounce.attachments] == [
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_null_sender_marks_automatic_mail() -> None:
    parsed = parse_email(sample("plain.eml"), envelope_from="", recipients=OURS)
    assert parsed.auto_submitted is True


def test_no_from_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidEmail, match="no From address"):
        parse(sample("no-from.eml"))


def test_invalid_from_is_refused() -> None:
    raw = sample("plain.eml").replace(b"<Alice@Customer.test>", b"<not an address>")
    with pytest.raises(InvalidEmail, match="From"):
        parse(raw)


def test_empty_mail_is_refused() -> None:
    raw = b"From: a@customer.test\r\nTo: support@example.com\r\n\r\n"
    with pytest.raises(InvalidEmail, match="no text"):
        to_contact_event(parse(raw), now=NOW)
    with pytest.raises(InvalidEmail, match="empty"):
        parse(b"  \r\n")


def test_missing_message_id_uses_a_hash_of_the_bytes() -> None:
    raw = b"From: a@customer.test\r\nSubject: hi\r\n\r\nhello\r\n"
    first = to_contact_event(parse(raw), now=NOW)
    again = to_contact_event(parse(raw), now=NOW)
    other = to_contact_event(parse(raw + b"!"), now=NOW)
    assert first.event_id.startswith("sha256:")
    assert first.event_id == again.event_id != other.event_id
    assert first.payload["message_id"] is None


@pytest.mark.parametrize(
    "date", [None, b"Date: yesterday-ish", b"Date: Fri, 27 Nov 2099 09:12:44 +0100"]
)
def test_missing_or_invalid_date_falls_back_to_now(date: bytes | None) -> None:
    raw = b"From: a@customer.test\r\nSubject: hi\r\n"
    if date is not None:
        raw += date + b"\r\n"
    event = to_contact_event(parse(raw + b"\r\nhello\r\n"), now=NOW)
    assert event.occurred_at == NOW


def test_huge_text_is_truncated_to_fit_one_record() -> None:
    body = ("\x01x" * 400_000).encode()  # control characters would escape 6x in JSON
    raw = b"From: a@customer.test\r\nSubject: big\r\n\r\n" + body + ("y" * 300_000).encode()
    event = to_contact_event(parse(raw), now=NOW)
    assert len(encode_contact_event(event)) < 1024 * 1024
    assert event.payload["truncated"] is True


def test_headers_that_break_the_stdlib_parser_are_read_raw() -> None:
    # policy.default raises IndexError on this Content-Type (found by fuzzing).
    raw = b"From: a@customer.test\nContent-Type: text/plain; cha\xf7\xc6\xb7\xe5\xb0~*\n\nhello\n"
    parsed = parse(raw)
    assert parsed.sender == "a@customer.test"
    assert parsed.text.strip() == "hello"


def test_forwarded_mail_is_an_attachment() -> None:
    inner = EmailMessage()
    inner["From"] = "x@elsewhere.test"
    inner["Subject"] = "original"
    inner.set_content("forwarded body")
    outer = EmailMessage()
    outer["From"] = "a@customer.test"
    outer["Subject"] = "Fwd: original"
    outer.set_content("see below")
    outer.add_attachment(inner)
    parsed = parse(outer.as_bytes())
    assert parsed.text.strip() == "see below"
    [attachment] = parsed.attachments
    assert attachment.content_type == "message/rfc822"
    assert b"forwarded body" in attachment.data


def test_attachment_names_are_labels_not_paths() -> None:
    mail = EmailMessage()
    mail["From"] = "a@customer.test"
    mail["Subject"] = "files"
    mail.set_content("two files")
    mail.add_attachment(b"\x00\x01", maintype="image", subtype="png", filename="../../etc/x.png")
    mail.add_attachment(b"data", maintype="application", subtype="octet-stream")
    names = [a.name for a in parse(mail.as_bytes()).attachments]
    assert names == ["x.png", "attachment-2.bin"]


@pytest.mark.parametrize(
    ("text", "new"),
    [
        ("new\n\nOn Mon, 1 Jan 2026, Bob <b@x.test> wrote:\n> old\n> older", "new"),
        ("new\nOn Mon, 1 Jan 2026 at 10:00, Bob <\nb@x.test> wrote:\n> old", "new"),
        ("> old question\nmy answer\n> second\nsecond answer", "my answer\nsecond answer"),
        ("thanks\n-- \nBob\nACME", "thanks"),
        ("thanks\n\n-----Original Message-----\nFrom: x\nold", "thanks"),
        ("thanks\n\nFrom: Support <s@x.test>\nSent: Monday\nold", "thanks"),
        ("> only a quote", "> only a quote"),
        ("I wrote: this line is mine", "I wrote: this line is mine"),
    ],
)
def test_new_text_leaves_out_quotes_and_signatures(text: str, new: str) -> None:
    assert new_text_of(text) == new


# --------------------------------------------------------------------------- sender building


def test_reply_subject_does_not_stack() -> None:
    conversation = str(uuid.uuid4())
    tag = thread_tokens.subject_tag(conversation)
    assert reply_subject("Order 4412", conversation) == f"Re: Order 4412 {tag}"
    assert reply_subject("RE: Re: Order 4412", conversation) == f"Re: Order 4412 {tag}"
    assert reply_subject(f"Re: Order 4412 {tag}", conversation) == f"Re: Order 4412 {tag}"
    assert reply_subject(None, conversation) == f"Re: (no subject) {tag}"


def test_outbound_message_id_is_stable_across_retries() -> None:
    sender = SmtpSender("127.0.0.1", 1, from_address="support@example.com", domain="example.com")
    conversation = str(uuid.uuid4())
    message = OutboundMessage(
        message_id="m1",
        conversation_id=conversation,
        channel="email",
        text="hi",
        to="alice@customer.test",
        subject="Order",
        in_reply_to="<c2@customer.test>",
        references=("<c2@customer.test>", "<c1@customer.test>"),
    )
    first, retry = sender.build(message), sender.build(message)
    assert first["Message-ID"] == retry["Message-ID"]
    assert thread_tokens.from_message_id(str(first["Message-ID"])) == uuid.UUID(conversation)
    assert str(first["References"]) == "<c1@customer.test> <c2@customer.test>"


# --------------------------------------------------------------------------- attachment store


def test_attachment_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = AttachmentStore(tmp_path)
    ref = store.put(b"hello")
    assert ref == content_ref(b"hello")
    digest = ref.removeprefix("sha256:")
    path = tmp_path / "attachments" / digest[:2] / digest
    assert path.read_bytes() == b"hello"
    assert store.put(b"hello") == ref  # stored once
    assert sorted(p.name for p in path.parent.iterdir()) == [digest]  # no temp files left
    assert store.get(ref) == b"hello"
    assert ref in store
    with pytest.raises(UnknownAttachment):
        store.get("sha256:../../etc/passwd")
    with pytest.raises(UnknownAttachment):
        store.get(content_ref(b"never stored"))


# --------------------------------------------------------------------------- fuzzing

SAMPLE_BYTES = [p.read_bytes() for p in sorted(SAMPLES.glob("*.eml"))]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(raw: bytes) -> None:
    try:
        parsed = parse_email(raw, envelope_from="x@customer.test", recipients=OURS)
        event = to_contact_event(parsed, now=NOW)
    except InvalidEmail as exc:
        reason = str(exc)
        if not reason:
            raise AssertionError("a refusal without a reason") from exc
        return
    # Whatever is accepted must pass the ingest worker's gate and fit in one record.
    encoded = encode_contact_event(event)
    assert len(encoded) <= 1024 * 1024
    assert parse_contact_event(encoded, now=NOW) == event


@FUZZ
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_parse_or_are_refused(raw: bytes) -> None:
    _check(raw)


@FUZZ
@given(
    st.sampled_from(SAMPLE_BYTES),
    st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=40), st.binary()),
        max_size=6,
    ),
)
def test_mutated_samples_parse_or_are_refused(
    raw: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    data = bytearray(raw)
    for position, length, replacement in edits:
        at = position % (len(data) + 1)
        data[at : at + length] = replacement
    _check(bytes(data))


_HEADER_NAMES = st.sampled_from(
    [
        b"From",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"In-Reply-To",
        b"References",
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"Content-Disposition",
        b"Auto-Submitted",
        b"Sender",
    ]
)
_HEADER_VALUES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"=?utf-8?b?////?=",
            b"=?x-bad?q?=ff=fe?=",
            b'multipart/mixed; boundary="b"',
            b"text/plain; charset=rot13",
            b"text/plain; charset=idna",
            b"text/html; charset=utf-16",
            b"base64",
            b"x-uuencode",
            b"attachment; filename*=utf-8''%ff%fe\"",
            b"<a@b> <c@d",
            b'"unterminated <x@y.test>',
            b"Mon, 99 Foo 99999 99:99:99 +9999",
        ]
    ),
)


@FUZZ
@given(
    st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=8),
    st.binary(max_size=400),
)
def test_hostile_headers_parse_or_are_refused(
    headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    raw = b"From: a@customer.test\r\n"
    raw += b"".join(name + b": " + value.replace(b"\n", b" ") + b"\r\n" for name, value in headers)
    _check(raw + b"\r\n--b\r\n" + body + b"\r\n--b--\r\n")


_LINE_PIECES = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\n ", b"X-A: b", b":", b"\x80", b" "]
)


@FUZZ
@given(
    st.sampled_from(SAMPLE_BYTES),
    st.lists(st.tuples(st.integers(min_value=0, max_value=400), _LINE_PIECES), max_size=6),
)
def test_one_part_shortcut_reads_what_the_full_parser_reads(
    raw: bytes, edits: list[tuple[int, bytes]]
) -> None:
    data = bytearray(raw)
    for position, piece in edits:
        data[position:position] = piece
    quick = _parse_single_part(bytes(data))
    if quick is None:
        return
    full = BytesParser(policy=policy.default).parsebytes(bytes(data))
    assert not full.is_multipart()
    assert list(quick.raw_items()) == list(full.raw_items())
    assert quick.get_payload(decode=True) == full.get_payload(decode=True)
