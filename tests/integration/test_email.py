"""The email channel over real sockets: smtplib → our SMTP server → KafkaPublisher → the
session broker (records consumed back), and SmtpSender → a local SMTP relay stand-in."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.attachments import AttachmentStore
from adapters.email_in import InboxSMTP, SmtpServer, smtp_server
from adapters.email_out import SmtpSender
from adapters.kafka import KafkaPublisher
from adapters.outbound import OutboundMessage, PermanentFailure, TemporaryFailure
from inbox import thread_tokens
from inbox.contact import ContactEvent, parse_contact_event
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import ensure_topics, make_consumer
from tests.conftest import TopicFactory

SAMPLES = Path(__file__).parent.parent / "samples" / "email"
DOMAINS = ["example.com", "example.org"]
CUSTOMER = "alice@customer.test"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


# --------------------------------------------------------------------------- helpers


def _sendmail(port: int, raw: bytes, to: list[str], sender: str = CUSTOMER) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        refused: dict[str, Any] = client.sendmail(sender, to, raw)
        return refused


async def sendmail(
    port: int, raw: bytes, to: list[str] | None = None, sender: str = CUSTOMER
) -> dict[str, Any]:
    """smtplib in a thread: the server runs on this test's loop."""
    return await asyncio.to_thread(_sendmail, port, raw, to or ["support@example.com"], sender)


def _data_without_size(port: int, raw: bytes) -> tuple[int, bytes | str]:
    """MAIL without SIZE=, so the limit is hit while the data is read."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo()
        client.mail(CUSTOMER)
        client.rcpt("support@example.com")
        try:
            return client.data(raw)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


async def published(
    bootstrap: str, topic: str, expected: int, *, settle: float = 1.0
) -> list[tuple[bytes, ContactEvent]]:
    """The records of `topic`: waits for `expected`, then `settle` seconds for any extra."""
    consumer = make_consumer(bootstrap, None, topic)
    await consumer.start()
    try:
        found: list[Any] = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(found) < expected and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(records)
        for records in (await consumer.getmany(timeout_ms=int(settle * 1000))).values():
            found.extend(records)
        return [(r.key, parse_contact_event(r.value)) for r in found]
    finally:
        await consumer.stop()


@dataclass
class Channel:
    server: SmtpServer
    bootstrap: str
    topic: str
    data_dir: Path

    @property
    def port(self) -> int:
        return self.server.port

    async def events(self, expected: int, *, settle: float = 1.0) -> list[ContactEvent]:
        return [e for _, e in await published(self.bootstrap, self.topic, expected, settle=settle)]


@pytest.fixture
async def channel(
    kafka_bootstrap: str, fresh_topic: TopicFactory, tmp_path: Path
) -> AsyncIterator[Channel]:
    topic = fresh_topic("email")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    publisher = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    server = smtp_server(
        publisher,
        host="127.0.0.1",
        port=0,
        domains=DOMAINS,
        data_dir=tmp_path,
        max_size=200_000,
    )
    await server.start()
    try:
        yield Channel(server, kafka_bootstrap, topic, tmp_path)
    finally:
        await server.stop()
        await publisher.close()


# --------------------------------------------------------------------------- inbound


async def test_plain_mail_is_one_contact_event_acknowledged_after_kafka(channel: Channel) -> None:
    assert await sendmail(channel.port, sample("plain.eml")) == {}
    [(key, event)] = await published(channel.bootstrap, channel.topic, 1)
    assert key == b"email:alice@customer.test"
    assert event.event_id == "<CAF3x9k2Lq=ab12cd34ef@mail.customer.test>"
    assert event.channel == "email"
    assert event.type == "message.received"
    assert event.customer.email == "alice@customer.test"
    assert event.customer.name == "Alice Moreau"
    assert event.payload["subject"] == "Order 4412 not delivered"
    assert "has not arrived" in event.payload["text"]
    assert event.payload["to"] == ["support@example.com"]
    assert event.payload["auto_submitted"] is False


async def test_multipart_attachment_is_stored_by_content(channel: Channel) -> None:
    await sendmail(channel.port, sample("multipart-attachment.eml"))
    [event] = await channel.events(1)
    assert event.payload["subject"] == "Fatura não confere"
    [attachment] = event.payload["attachments"]
    assert attachment["name"] == "fatura.pdf"
    assert attachment["type"] == "application/pdf"
    stored = AttachmentStore(channel.data_dir).get(attachment["ref"])
    assert stored.startswith(b"%PDF-1.4")
    assert len(stored) == attachment["size"]
    digest = attachment["ref"].removeprefix("sha256:")
    assert (channel.data_dir / "attachments" / digest[:2] / digest).read_bytes() == stored


async def test_non_utf8_bodies_and_encoded_subjects(channel: Channel) -> None:
    await sendmail(channel.port, sample("shift-jis.eml"))
    await sendmail(channel.port, sample("latin1.eml"))
    japanese, french = await channel.events(2)
    assert japanese.payload["subject"] == "注文について"
    assert japanese.customer.name == "山田 太郎"
    assert japanese.payload["new_text"].endswith("まだ届いていません。")
    assert "山田太郎" in japanese.payload["text"]  # the signature stays in the full text
    assert french.payload["subject"] == "Problème de livraison"
    assert french.payload["new_text"] == "Bonjour, le colis n'est pas arrivé. Merci d'avance."


async def test_html_only_mail_has_extracted_text(channel: Channel) -> None:
    await sendmail(channel.port, sample("html-only.eml"))
    [event] = await channel.events(1)
    assert event.payload["new_text"] == "Hello team,\n\nthe parcel is damaged.\nPhoto follows."
    assert "<b>parcel</b>" in event.payload["html"]


async def test_reply_to_our_message_carries_thread_ids_and_token(channel: Channel) -> None:
    conversation = uuid.uuid4()
    ours = thread_tokens.outbound_message_id("reply-1", conversation, "example.com")
    mail = EmailMessage()
    mail["From"] = "Alice <alice@customer.test>"
    mail["To"] = "support@example.com"
    mail["Subject"] = "Re: Order 4412 " + thread_tokens.subject_tag(conversation)
    mail["Message-ID"] = "<answer-1@customer.test>"
    mail["In-Reply-To"] = ours
    mail["References"] = f"<first@customer.test> {ours}"
    mail.set_content("It arrived, thanks.\n\n> We shipped it.\n")
    reply_to = thread_tokens.reply_address("support", conversation, "example.com")
    await sendmail(channel.port, mail.as_bytes(), to=[reply_to])
    [event] = await channel.events(1)
    assert event.thread.ref == thread_tokens.conversation_token(conversation)
    assert event.thread.in_reply_to == (ours, "<first@customer.test>")
    assert thread_tokens.from_message_id(event.thread.in_reply_to[0]) == conversation
    assert event.payload["new_text"] == "It arrived, thanks."


async def test_auto_reply_is_marked(channel: Channel) -> None:
    await sendmail(channel.port, sample("auto-reply.eml"))
    await sendmail(channel.port, sample("bounce.eml"), sender="")  # null reverse-path
    auto_reply, bounce = await channel.events(2)
    assert auto_reply.payload["auto_submitted"] is True
    assert bounce.payload["auto_submitted"] is True


async def test_one_mail_to_several_of_our_addresses_is_one_event(channel: Channel) -> None:
    refused = await sendmail(
        channel.port,
        sample("plain.eml"),
        to=["support@example.com", "sales@example.org", "someone@elsewhere.test"],
    )
    assert list(refused) == ["someone@elsewhere.test"]
    assert refused["someone@elsewhere.test"][0] == 550
    [event] = await channel.events(1)
    assert event.payload["to"] == ["support@example.com", "sales@example.org"]
    assert event.payload["via"] == "support@example.com"


async def test_unknown_recipient_domain_gets_550_and_nothing_is_published(
    channel: Channel,
) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await sendmail(channel.port, sample("plain.eml"), to=["support@example.net"])
    assert refused.value.recipients["support@example.net"][0] == 550
    assert await channel.events(0) == []


async def test_oversize_mail_gets_552_and_nothing_is_published(channel: Channel) -> None:
    big = sample("plain.eml") + b"x" * 76 + b"\r\n" * 3000 + (b"y" * 76 + b"\r\n") * 3000
    with pytest.raises(smtplib.SMTPSenderRefused) as announced:  # SIZE= in MAIL FROM
        await sendmail(channel.port, big)
    assert announced.value.smtp_code == 552
    code, _ = await asyncio.to_thread(_data_without_size, channel.port, big)
    assert code == 552
    assert await channel.events(0) == []


async def test_mail_without_from_is_refused_with_the_reason(channel: Channel) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await sendmail(channel.port, sample("no-from.eml"))
    assert refused.value.smtp_code == 550
    assert b"no From address" in refused.value.smtp_error
    assert await channel.events(0) == []


async def test_the_same_mail_twice_has_the_same_event_id(channel: Channel) -> None:
    await sendmail(channel.port, sample("reply.eml"))
    await sendmail(channel.port, sample("reply.eml"))
    first, second = await channel.events(2)
    assert first.event_id == second.event_id == "<CAF3x9k2Lq=zz98yy76@mail.customer.test>"


@pytest.mark.slow  # a broker of its own, stopped and started again
async def test_kafka_down_answers_451_and_the_retry_publishes_once(
    fresh_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = fresh_topic("email-down")
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    port = broker.port
    try:
        await ensure_topics(broker.bootstrap, {topic: 1})
        publisher = KafkaPublisher(broker.bootstrap, idempotence=False, topic=topic, timeout=5)
        server = smtp_server(
            publisher, host="127.0.0.1", port=0, domains=DOMAINS, data_dir=tmp_path
        )
        async with server:
            await sendmail(server.port, sample("plain.eml"))  # the producer is up
            await asyncio.to_thread(broker.stop)
            with pytest.raises(smtplib.SMTPDataError) as deferred:
                await sendmail(server.port, sample("reply.eml"))
            assert deferred.value.smtp_code == 451

            broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker2.log")
            await asyncio.to_thread(broker.start)
            await ensure_topics(broker.bootstrap, {topic: 1})
            # As a sending MTA does: retry while told to. A freshly restarted embedded broker
            # can refuse the first produce (UnknownError), which must be a 451 again.
            for _ in range(20):
                try:
                    assert await sendmail(server.port, sample("reply.eml")) == {}
                    break
                except smtplib.SMTPDataError as again:
                    if again.smtp_code != 451:
                        raise
                    await asyncio.sleep(0.5)
            else:
                raise AssertionError("the mail was never accepted after Kafka came back")
        await publisher.close()
        # The restarted broker keeps records in memory only: it holds the retry, and perhaps
        # the attempt answered 451 too, delivered late by the abandoned producer (Kafka
        # producers are at-least-once). Both carry the mail's event_id, which the ingest
        # worker takes in once (tests/integration/test_ingest_worker.py).
        records = await published(broker.bootstrap, topic, 1)
        assert 1 <= len(records) <= 2
        assert {event.event_id for _, event in records} == {
            "<CAF3x9k2Lq=zz98yy76@mail.customer.test>"
        }
    finally:
        await asyncio.to_thread(broker.stop)


async def test_publisher_that_never_reached_kafka_answers_451(tmp_path: Path) -> None:
    publisher = KafkaPublisher(f"127.0.0.1:{free_port()}", idempotence=False, timeout=3)
    server = smtp_server(publisher, host="127.0.0.1", port=0, domains=DOMAINS, data_dir=tmp_path)
    async with server:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            await sendmail(server.port, sample("plain.eml"))
    await publisher.close()
    assert deferred.value.smtp_code == 451


def _self_signed(directory: Path) -> ssl.SSLContext:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_starttls_and_auth_when_configured(
    kafka_bootstrap: str, fresh_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = fresh_topic("email-auth")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    publisher = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    server = smtp_server(
        publisher,
        host="127.0.0.1",
        port=0,
        domains=DOMAINS,
        data_dir=tmp_path,
        tls_context=_self_signed(tmp_path),
        require_starttls=True,
        auth={"relay": "s3cret"},
    )

    def session(password: str | None) -> dict[str, Any]:
        client_context = ssl.create_default_context()
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
            client.starttls(context=client_context)
            if password is not None:
                client.login("relay", password)
            refused: dict[str, Any] = client.sendmail(
                CUSTOMER, ["support@example.com"], sample("plain.eml")
            )
            return refused

    async with server:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            await asyncio.to_thread(session, "wrong")
        with pytest.raises(smtplib.SMTPSenderRefused) as unauthenticated:
            await asyncio.to_thread(session, None)
        assert unauthenticated.value.smtp_code == 530
        assert await asyncio.to_thread(session, "s3cret") == {}
    await publisher.close()
    assert len(await published(kafka_bootstrap, topic, 1)) == 1


def test_auth_without_tls_is_refused(tmp_path: Path) -> None:
    publisher = KafkaPublisher("127.0.0.1:1", idempotence=False)
    with pytest.raises(ValueError, match="TLS"):
        smtp_server(
            publisher,
            host="127.0.0.1",
            port=0,
            domains=DOMAINS,
            data_dir=tmp_path,
            auth={"u": "p"},
        )


async def test_lines_starting_with_a_dot_arrive_intact(channel: Channel) -> None:
    mail = EmailMessage()
    mail["From"] = "Alice <alice@customer.test>"
    mail["To"] = "support@example.com"
    mail["Subject"] = "Dots"
    mail["Message-ID"] = "<dots-1@customer.test>"
    mail.set_content("first\n.\n..two\n.three\nlast.\n")
    # CRLF line ends, as an MTA sends them: smtplib doubles each leading dot.
    await sendmail(channel.port, mail.as_bytes(policy=policy.SMTP))
    [event] = await channel.events(1)
    assert event.payload["text"] == "first\n.\n..two\n.three\nlast.\n"


# ------------------------------------------------ InboxSMTP against aiosmtpd's own SMTP


class Capture:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(envelope.original_content or b"")
        return "250 kept"


DIFF_SIZE_LIMIT = 4000


async def _reply(reader: asyncio.StreamReader) -> bytes:
    lines = [await reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(await reader.readline())
    return b"".join(lines)


async def _converse(port: int, chunks: list[bytes], pipelined: bool) -> list[bytes]:
    """One transaction, the data written in `chunks`; the replies from EHLO on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)  # the greeting names aiosmtpd's version: not compared
        replies = []
        for command in (b"EHLO client.test", b"MAIL FROM:<a@customer.test>", b"RCPT TO:<s@x.test>"):
            writer.write(command + b"\r\n")
            replies.append(await _reply(reader))
        writer.write(b"DATA\r\n")
        replies.append(await _reply(reader))
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            writer.write(chunk + (b"NOOP\r\n" if last and pipelined else b""))
            await writer.drain()
            await asyncio.sleep(0)
        replies.append(await _reply(reader))
        if not pipelined:
            writer.write(b"NOOP\r\n")
        replies.append(await _reply(reader))  # the reader took no more than the data
        return replies
    finally:
        writer.close()
        await writer.wait_closed()


async def _both(chunks: list[bytes], pipelined: bool) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    results = []
    for protocol in (SMTP, InboxSMTP):
        handler = Capture()
        server = await loop.create_server(
            lambda p=protocol, h=handler: p(  # type: ignore[misc]
                h, hostname="mx.test", data_size_limit=DIFF_SIZE_LIMIT, loop=loop
            ),
            "127.0.0.1",
            0,
        )
        try:
            port = server.sockets[0].getsockname()[1]
            results.append((await _converse(port, chunks, pipelined), handler.contents))
        finally:
            server.close()
            await server.wait_closed()
    return results[0], results[1]


# Pieces that reach the edges: lines of 999-1004 bytes (the 1001-byte limit with its CRLF and
# the stream reader's own limit), dots anywhere, bare CR and LF, data around the size limit.
_PIECES = [b"a", b".", b"\r", b"\n", b" ", b"x" * 100, b"y" * 499, b"z" * 997, b"w" * 1000]
_LINES = st.lists(
    st.builds(
        lambda dot, parts: (b"." if dot else b"") + b"".join(parts),
        st.booleans(),
        st.lists(st.sampled_from(_PIECES), max_size=6),
    ),
    max_size=8,
)


def _stream(lines: list[bytes]) -> bytes | None:
    data = b"".join(line + b"\r\n" for line in lines)
    if b"\r\n.\r\n" in b"\r\n" + data:
        return None  # the data would end early: not one transaction
    return data + b".\r\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=_LINES.map(_stream).filter(lambda s: s is not None),
    cuts=st.lists(st.integers(min_value=1, max_value=6000), max_size=6),
    pipelined=st.booleans(),
)
def test_data_reader_answers_and_keeps_what_aiosmtpd_does(
    stream: bytes, cuts: list[int], pipelined: bool
) -> None:
    points = sorted({c for c in cuts if c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    theirs, ours = asyncio.run(_both(chunks, pipelined))
    assert ours == theirs


def test_data_reader_refusals_match_aiosmtpd() -> None:
    """The three answers each met at least once (the property above draws them at random)."""
    cases = {
        b"ok\r\n.\r\n": b"250",
        b"a" * 1000 + b"\r\n.\r\n": b"500",  # 1002 bytes with its CRLF
        (b"b" * 70 + b"\r\n") * 80 + b".\r\n": b"552",
        b"c" * 2000 + b"\r\n" + (b"d" * 70 + b"\r\n") * 80 + b".\r\n": b"500",
    }
    for stream, code in cases.items():
        theirs, ours = asyncio.run(_both([stream], pipelined=False))
        assert ours == theirs
        assert ours[0][-2].startswith(code)


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"


@settings(max_examples=200, deadline=None)
@given(
    arg=st.one_of(
        st.text(alphabet=_ATEXT + '<>@. "()[]:;,\\\t\u00e9', max_size=40),
        st.builds(
            lambda local, domain, rest: f"<{local}@{domain}>{rest}",
            st.text(alphabet=_ATEXT + '. "\u00e9', min_size=1, max_size=12),
            st.text(alphabet="abcXZ09-.[]:", min_size=1, max_size=12),
            st.sampled_from(["", " SIZE=2000", " BODY=8BITMIME SMTPUTF8", "x", " <b@c>"]),
        ),
    )
)
def test_plain_paths_read_as_aiosmtpd_reads_them(arg: str) -> None:
    def outcome(read: Any) -> object:
        try:
            return read(arg)
        except (LookupError, ValueError, AttributeError, TypeError) as exc:
            # aiosmtpd's parser raises on some input ("<"): so must we
            return type(exc)

    loop = asyncio.new_event_loop()
    try:
        protocol = InboxSMTP(Capture(), loop=loop)
        assert outcome(protocol._getaddr) == outcome(lambda a: SMTP._getaddr(protocol, a))
    finally:
        loop.close()


# --------------------------------------------------------------------------- outbound


@dataclass
class Relay:
    """A stand-in for the SMTP relay: records what it receives; can refuse."""

    rcpt_reply: str = "250 OK"
    data_reply: str = "250 OK"
    received: list[Envelope] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.rcpt_reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return self.rcpt_reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply.startswith("250"):
            self.received.append(envelope)
        return self.data_reply


@pytest.fixture
async def relay() -> AsyncIterator[tuple[Relay, int]]:
    handler = Relay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="relay.test", loop=loop), "127.0.0.1", 0
    )
    try:
        yield handler, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def reply(conversation: uuid.UUID, **overrides: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "message_id": "msg-1",
        "conversation_id": str(conversation),
        "channel": "email",
        "text": "Your parcel is on its way.\nRegards, Support",
        "to": "alice@customer.test",
        "customer_name": "Alice Moreau",
        "subject": "Re: Order 4412 not delivered",
        "in_reply_to": "<c2@customer.test>",
        "references": ("<c2@customer.test>", "<c1@customer.test>"),
    }
    values.update(overrides)
    return OutboundMessage(**values)


def sender_for(port: int) -> SmtpSender:
    return SmtpSender(
        "127.0.0.1",
        port,
        from_address="support@example.com",
        domain="example.com",
        from_name="Support",
        timeout=10,
    )


async def test_smtp_sender_threads_the_reply(relay: tuple[Relay, int]) -> None:
    handler, port = relay
    conversation = uuid.uuid4()
    token = thread_tokens.conversation_token(conversation)
    result = await sender_for(port).send(reply(conversation))
    [envelope] = handler.received
    assert envelope.mail_from == "support@example.com"
    assert envelope.rcpt_tos == ["alice@customer.test"]
    assert envelope.original_content is not None
    mail = message_from_bytes(envelope.original_content, policy=policy.default)
    expected_id = thread_tokens.outbound_message_id("msg-1", conversation, "example.com")
    assert mail["Message-ID"] == expected_id
    assert result.provider_id == expected_id
    assert result.status == "sent"
    assert mail["In-Reply-To"] == "<c2@customer.test>"
    assert mail["References"] == "<c1@customer.test> <c2@customer.test>"
    assert mail["Reply-To"] == f"support+{token}@example.com"
    assert mail["Subject"] == f"Re: Order 4412 not delivered [#{token}]"
    assert mail["To"] == "Alice Moreau <alice@customer.test>"
    assert mail["From"] == "Support <support@example.com>"
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None
    assert (
        body.get_content().replace("\r\n", "\n") == "Your parcel is on its way.\nRegards, Support\n"
    )


async def test_smtp_sender_replies_from_the_address_the_customer_wrote_to(
    relay: tuple[Relay, int],
) -> None:
    handler, port = relay
    conversation = uuid.uuid4()
    token = thread_tokens.conversation_token(conversation)
    await sender_for(port).send(reply(conversation, via="sales@example.org"))
    [envelope] = handler.received
    assert envelope.original_content is not None
    mail = message_from_bytes(envelope.original_content, policy=policy.default)
    assert mail["From"] == "Support <sales@example.org>"
    assert mail["Reply-To"] == f"sales+{token}@example.org"


async def test_smtp_sender_keeps_the_message_id_across_retries(relay: tuple[Relay, int]) -> None:
    handler, port = relay
    conversation = uuid.uuid4()
    sender = sender_for(port)
    first = await sender.send(reply(conversation))
    again = await sender.send(reply(conversation, attempt=2))
    assert first.provider_id == again.provider_id
    assert len(handler.received) == 2


async def test_relay_down_is_a_temporary_failure() -> None:
    with pytest.raises(TemporaryFailure):
        await sender_for(free_port()).send(reply(uuid.uuid4()))


@pytest.mark.parametrize(
    ("rcpt", "data", "failure"),
    [
        ("550 5.1.1 no such user", "250 OK", PermanentFailure),
        ("450 4.2.0 mailbox busy", "250 OK", TemporaryFailure),
        ("250 OK", "554 5.7.1 rejected as spam", PermanentFailure),
        ("250 OK", "451 4.3.0 try later", TemporaryFailure),
    ],
)
async def test_relay_refusals_map_to_failures(
    relay: tuple[Relay, int], rcpt: str, data: str, failure: type[Exception]
) -> None:
    handler, port = relay
    handler.rcpt_reply, handler.data_reply = rcpt, data
    with pytest.raises(failure):
        await sender_for(port).send(reply(uuid.uuid4()))
    assert handler.received == []
