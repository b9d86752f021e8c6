"""The SMTP server: mail for our domains in, one contact event per mail to Kafka.

The server runs on the application's own asyncio loop (aiosmtpd's `SMTP` protocol served by
`loop.create_server`; aiosmtpd's `Controller` would start a thread and a loop of its own).
Answers, in SMTP terms of what the sender should do:

- RCPT to a domain we do not serve: 550 (never retry).
- More than `max_size` bytes: 552 (aiosmtpd's data_size_limit, also announced in EHLO SIZE).
- A mail that cannot be a contact event (no From, ...): 550 with the reason.
- Attachments not storable or Kafka not acknowledging: 451, so the sender keeps the mail and
  retries; nothing was published.
- 250 only after Kafka acknowledged the event.

One mail to several of our addresses is one transaction, so one contact event.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import ssl
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from adapters.attachments import AttachmentStore
from adapters.kafka import PublishFailed
from adapters.mime import InvalidEmail, ParsedEmail, parse_email, to_contact_event
from inbox.contact import ContactEvent
from inbox.ports import Publisher

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_SIZE = 25 * MiB
# Parsing is CPU work; a big mail is parsed in a thread so other sessions keep going.
_PARSE_IN_THREAD_BYTES = 256 * 1024


def _reply_text(reason: str) -> str:
    """An SMTP reply line: printable ASCII, bounded."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in reason)
    return text[:300]


class EmailHandler:
    """aiosmtpd handler: RCPT checks the domain, DATA parses, stores, publishes."""

    def __init__(
        self,
        publisher: Publisher,
        attachments: AttachmentStore,
        domains: Iterable[str],
    ) -> None:
        self.publisher = publisher
        self.attachments = attachments
        self.domains = frozenset(d.strip().lower().rstrip(".") for d in domains if d.strip())
        if not self.domains:
            raise ValueError("the SMTP server needs at least one accepted domain")

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not local or domain.lower().rstrip(".") not in self.domains:
            return f"550 5.1.1 <{_reply_text(address)[:200]}>: no such domain here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content  # bytes as received (decode_data is off)
        try:
            if len(raw or b"") > _PARSE_IN_THREAD_BYTES:
                parsed, event = await asyncio.to_thread(self._translate, raw, envelope)
            else:
                parsed, event = self._translate(raw, envelope)
        except InvalidEmail as exc:
            log.info("refused a mail from %r: %s", envelope.mail_from, exc)
            return f"550 5.6.0 {_reply_text(str(exc))}"
        if parsed.attachments:
            try:
                await asyncio.to_thread(self._store_attachments, parsed)
            except OSError as exc:
                log.error("could not store attachments: %r", exc)
                return "451 4.3.0 cannot store attachments now, try again later"
        try:
            await self.publisher.publish(event)
        except PublishFailed:
            return "451 4.3.0 cannot accept mail now, try again later"
        return f"250 2.0.0 OK {_reply_text(event.event_id)[:200]}"

    def _translate(self, raw: bytes | None, envelope: Envelope) -> tuple[ParsedEmail, ContactEvent]:
        parsed = parse_email(
            raw or b"", envelope_from=envelope.mail_from, recipients=list(envelope.rcpt_tos)
        )
        return parsed, to_contact_event(parsed)

    def _store_attachments(self, parsed: ParsedEmail) -> None:
        for attachment in parsed.attachments:
            self.attachments.put(attachment.data)


# --------------------------------------------------------------------------- the protocol

# aiosmtpd's answers, word for word.
TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH = "552 Error: Too much mail data"

# A reverse- or forward-path in its plain form `<dot-atom@dot-atom>`: what nearly every MTA
# sends. Anything else goes to aiosmtpd's own parser (email._header_value_parser).
_PLAIN_PATH = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
)


def data_verdict(raw: bytes, length: int, size_limit: int | None, line_limit: int) -> str | None:
    """aiosmtpd's verdict on DATA, decided once on the bytes instead of line by line: None
    when the data is accepted, else the 500 (a line longer than `line_limit` with its CRLF) or
    552 (more than `size_limit` bytes) answer, whichever aiosmtpd's line reader meets first.

    `raw` is the data before the final `.CRLF` (at least its first size_limit + line_limit + 3
    bytes, which is enough to decide), `length` its full length."""
    too_much = bool(size_limit) and length > (size_limit or 0)
    lines = raw.split(b"\r\n")
    if max(map(len, lines)) + 2 <= line_limit:
        return TOO_MUCH if too_much else None
    if not too_much:
        return TOO_LONG
    assert size_limit
    start = 0
    for line in lines:
        size = len(line) + 2
        if size > line_limit:
            # A line beyond the stream reader's limit (line_limit + 2) is refused before it is
            # counted; a shorter one is counted first, and may cross the size limit.
            counted = start if size > line_limit + 2 else start + size
            return TOO_MUCH if counted > size_limit else TOO_LONG
        start += size
        if start > size_limit:
            return TOO_MUCH
    return TOO_MUCH


def unstuff(raw: bytes) -> bytes:
    """Removes the leading dot of every line, as aiosmtpd does (RFC 5321 4.5.2)."""
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


class InboxSMTP(SMTP):
    """aiosmtpd's SMTP session, with two costs taken out of the way of every mail:

    - DATA is read in chunks (up to each `.CRLF` or as much as is buffered) instead of one
      await per line: aiosmtpd's reader spent more time per 20 KB mail than parsing it. The
      answers are aiosmtpd's own, decided on the whole data by `data_verdict`: 552 past
      `data_size_limit`, 500 for a line over 1001 bytes, with the data read to its end first.
    - MAIL and RCPT paths of the plain `<local@domain>` form are read with a regex; others go to
      aiosmtpd's parser.
    """

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = _PLAIN_PATH.match(arg)
        if plain is None:
            return super()._getaddr(arg)
        rest = arg[plain.end() :]
        if rest[:1] in (" ", "\t"):
            # aiosmtpd's parser takes the blanks after the path, and comments with them.
            rest = rest.lstrip(" \t")
            if rest.startswith("("):
                return super()._getaddr(arg)
        address = plain.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if self._decode_data:  # not how this server runs: aiosmtpd's own reader
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw, length = await self._read_data()
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        refusal = data_verdict(raw, length, self.data_size_limit, self.line_length_limit)
        if refusal is not None:
            await self.push(refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = unstuff(raw)
        self.envelope.content = content
        self.envelope.original_content = content
        status = MISSING
        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytes, int]:
        """The bytes before the final `.CRLF` (kept up to what data_verdict needs) and their
        length. Reads up to each `.CRLF`, or what the reader has buffered when a line has
        none; the end is a `.CRLF` right after a CRLF, or at the very start."""
        reader = self._reader
        size_limit = self.data_size_limit
        keep = size_limit + self.line_length_limit + 3 if size_limit else None
        chunks: list[bytes] = []
        kept = 0
        length = 0
        before = b"\r\n"  # the two bytes before the chunk: the data starts at a line start
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as over:
                # No .CRLF within the reader's limit: take what is buffered, less the bytes
                # that could start one.
                chunk = await reader.read(over.consumed)
            length += len(chunk)
            if keep is None or kept < keep:
                chunks.append(chunk)
                kept += len(chunk)
            if chunk.endswith(b".\r\n") and (before + chunk[-5:]).endswith(b"\r\n.\r\n"):
                break
            before = (before + chunk[-2:])[-2:]
        length -= 3
        if kept == length + 3:  # all kept: the last chunk ends with the final .CRLF
            chunks[-1] = chunks[-1][:-3]
            return b"".join(chunks), length
        assert keep is not None
        return b"".join(chunks)[: min(keep, length)], length


class _Authenticator:
    """AUTH PLAIN/LOGIN against a fixed user → password table (constant-time compare)."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {user: password.encode() for user, password in users.items()}

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        expected = self._users.get(user)
        if expected is None or not hmac.compare_digest(expected, auth_data.password):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)


class SmtpServer:
    """The listening SMTP server on the running loop. `await start()` / `await stop()`, or
    `async with`. `port` is the bound port (pass port=0 for a free one)."""

    def __init__(
        self,
        handler: EmailHandler,
        *,
        host: str,
        port: int,
        max_size: int,
        hostname: str,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: Mapping[str, str] | None = None,
        timeout: float = 300.0,
    ) -> None:
        if auth is not None and tls_context is None:
            # Passwords would cross the network in clear text.
            raise ValueError("SMTP AUTH needs a TLS context (STARTTLS)")
        self.handler = handler
        self.host = host
        self._port = port
        self._max_size = max_size
        self._hostname = hostname
        self._tls_context = tls_context
        self._require_starttls = require_starttls
        self._authenticator = _Authenticator(auth) if auth is not None else None
        self._timeout = timeout
        self._server: asyncio.Server | None = None
        # Weak: a closed session leaves by itself.
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _protocol(self) -> SMTP:
        protocol = InboxSMTP(
            self.handler,
            data_size_limit=self._max_size,
            enable_SMTPUTF8=True,
            hostname=self._hostname,
            tls_context=self._tls_context,
            require_starttls=self._require_starttls,
            timeout=self._timeout,
            auth_required=self._authenticator is not None,
            auth_require_tls=True,
            authenticator=self._authenticator,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(protocol)
        return protocol

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the SMTP server is already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=self.host, port=self._port)
        log.info("SMTP listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Sessions still open (idle clients) are closed too, so nothing outlives the server.
        for session in list(self._sessions):
            transport = session.transport
            if transport is not None and not transport.is_closing():
                transport.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    async def __aenter__(self) -> SmtpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def smtp_server(
    publisher: Publisher,
    *,
    host: str,
    port: int,
    domains: Iterable[str],
    data_dir: Path | str,
    max_size: int = DEFAULT_MAX_SIZE,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    auth: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> SmtpServer:
    """The SMTP server of the email channel (not started: `await server.start()` on the
    application's loop). `domains` are the accepted recipient domains (INBOX_EMAIL_DOMAINS);
    attachments go under `<data_dir>/attachments`; `auth` (user → password) requires AUTH,
    which in turn requires `tls_context`."""
    handler = EmailHandler(publisher, AttachmentStore(data_dir), domains)
    return SmtpServer(
        handler,
        host=host,
        port=port,
        max_size=max_size,
        # The greeting's name; aiosmtpd would otherwise ask DNS for the FQDN at every session.
        hostname=hostname or sorted(handler.domains)[0],
        tls_context=tls_context,
        require_starttls=require_starttls,
        auth=auth,
    )
