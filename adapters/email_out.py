"""Agents' replies by email, through an SMTP relay (INBOX_SMTP_RELAY), with aiosmtplib.

Every reply is threaded three ways, so the customer's answer finds its conversation whatever
their mail client keeps: our Message-ID carries the conversation token, the Reply-To address
carries it (`support+TOKEN@domain`), and so does the subject (`[#TOKEN]`). In-Reply-To and
References name the customer's mail, so their client shows the reply in the same thread.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr

import aiosmtplib

from adapters.outbound import OutboundMessage, PermanentFailure, SendResult, TemporaryFailure
from inbox import thread_tokens

_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|antw|réf|rif)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_TAG = re.compile(r"\s*\[#[a-z2-7]{26}\]", re.IGNORECASE)
_MESSAGE_ID = re.compile(r"<[^<>\s]+>")


def reply_subject(subject: str | None, conversation_id: str) -> str:
    """The reply's subject, "Re: <subject> [#TOKEN]", without stacking "Re:" or tags on a
    subject that has them already."""
    base = _TAG.sub("", subject or "")
    base = " ".join(_REPLY_PREFIX.sub("", base).split()) or "(no subject)"
    return f"Re: {base} {thread_tokens.subject_tag(conversation_id)}"


def _ids(*values: str | None) -> list[str]:
    found: list[str] = []
    for value in values:
        if value:
            found += _MESSAGE_ID.findall(value) or [f"<{value.strip().strip('<>')}>"]
    return list(dict.fromkeys(i for i in found if i != "<>"))


class SmtpSender:
    """ChannelSender for "email". `from_address` is ours (e.g. support@<first domain>);
    `domain` names our Message-IDs."""

    channels = frozenset({"email"})

    def __init__(
        self,
        relay_host: str,
        relay_port: int,
        *,
        from_address: str,
        domain: str,
        from_name: str | None = None,
        username: str | None = None,
        password: str | None = None,
        start_tls: bool | None = None,  # None: upgrade when the relay offers STARTTLS
        validate_certs: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.relay_host = relay_host
        self.relay_port = relay_port
        self.from_address = from_address
        self.domain = domain
        self.from_name = from_name
        self._username = username
        self._password = password
        self._start_tls = start_tls
        self._validate_certs = validate_certs
        self._timeout = timeout
        # Replies come back to support+TOKEN@domain: the local part of our own address.
        self._reply_local = from_address.partition("@")[0].partition("+")[0]

    def build(self, message: OutboundMessage, *, now: datetime | None = None) -> EmailMessage:
        """The MIME message of a reply (the same headers on every retry, Date aside)."""
        # The reply leaves from the address of ours the customer wrote to (the SMTP server
        # accepted it, so it is one of our domains); replies to it come back there.
        from_address = (message.via or "").strip() or self.from_address
        local, at, domain = from_address.rpartition("@")
        if not at or not local or not domain:
            from_address, local, domain = self.from_address, self._reply_local, self.domain
        mail = EmailMessage()
        mail["From"] = formataddr((self.from_name or "", from_address))
        mail["To"] = formataddr((message.customer_name or "", message.to))
        mail["Subject"] = reply_subject(message.subject, message.conversation_id)
        mail["Date"] = format_datetime(now or datetime.now(UTC))
        mail["Message-ID"] = thread_tokens.outbound_message_id(
            message.message_id, message.conversation_id, self.domain
        )
        mail["Reply-To"] = thread_tokens.reply_address(
            local.partition("+")[0] or local, message.conversation_id, domain
        )
        if message.in_reply_to:
            mail["In-Reply-To"] = _ids(message.in_reply_to)[0]
        # OutboundMessage.references lists the customer's ids newest first; the header lists
        # the thread oldest first, ending with the mail answered.
        references = _ids(*reversed(message.references), message.in_reply_to)
        if references:
            mail["References"] = " ".join(references)
        mail.set_content(message.text)
        return mail

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.channel != "email":
            raise PermanentFailure(f"the email sender cannot send on {message.channel!r}")
        try:
            mail = self.build(message)
        except (ValueError, TypeError) as exc:  # e.g. a header the email package refuses
            raise PermanentFailure(f"cannot build the mail: {exc}") from exc
        try:
            await aiosmtplib.send(
                mail,
                sender=self.from_address,  # the envelope sender: bounces come to the main box
                recipients=[message.to],
                hostname=self.relay_host,
                port=self.relay_port,
                username=self._username,
                password=self._password,
                start_tls=self._start_tls,
                validate_certs=self._validate_certs,
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            reason = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if codes and all(500 <= code < 600 for code in codes):
                raise PermanentFailure(f"the relay refused {message.to}: {reason}") from exc
            raise TemporaryFailure(f"the relay deferred {message.to}: {reason}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:
                raise PermanentFailure(
                    f"the relay refused the mail: {exc.code} {exc.message}"
                ) from exc
            raise TemporaryFailure(
                f"the relay deferred the mail: {exc.code} {exc.message}"
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Connection refused, timeouts, disconnects, TLS trouble: the relay may be back soon.
            raise TemporaryFailure(f"relay {self.relay_host}:{self.relay_port}: {exc}") from exc
        return SendResult(provider_id=str(mail["Message-ID"]), status="sent")
