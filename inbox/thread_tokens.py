"""Conversation tokens: how replies find their conversation when identities do not.

A token is the conversation id in 26 base32 characters, so nothing needs to be looked up to
read it back. It travels in our outbound Message-IDs (`<MSG.TOKEN@domain>`), in the reply-to
address (`support+TOKEN@domain`) and in the subject (`[#TOKEN]`), so a customer's reply threads
by In-Reply-To / References first and, when a client drops those headers, by the others.
"""

from __future__ import annotations

import base64
import re
from uuid import UUID

_TOKEN = re.compile(r"([a-z2-7]{26})", re.I)
_SUBJECT = re.compile(r"\[#([a-z2-7]{26})\]", re.I)
_PLUS = re.compile(r"^[^@+]+\+([a-z2-7]{26})@", re.I)
_MESSAGE_ID = re.compile(r"^<?[^<>@.]+\.([a-z2-7]{26})@[^<>]+>?\Z", re.I)


def conversation_token(conversation_id: UUID | str) -> str:
    raw = UUID(str(conversation_id)).bytes
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _decode(token: str) -> UUID | None:
    try:
        raw = base64.b32decode(token.upper() + "======")
    except ValueError:
        return None
    return UUID(bytes=raw) if len(raw) == 16 else None


def outbound_message_id(message_id: str, conversation_id: UUID | str, domain: str) -> str:
    """The Message-ID header of a reply we send."""
    return f"<{message_id}.{conversation_token(conversation_id)}@{domain}>"


def reply_address(local: str, conversation_id: UUID | str, domain: str) -> str:
    return f"{local}+{conversation_token(conversation_id)}@{domain}"


def subject_tag(conversation_id: UUID | str) -> str:
    return f"[#{conversation_token(conversation_id)}]"


def from_message_id(message_id: str) -> UUID | None:
    match = _MESSAGE_ID.match(message_id.strip())
    return _decode(match.group(1)) if match else None


def from_address(address: str) -> UUID | None:
    match = _PLUS.match(address.strip())
    return _decode(match.group(1)) if match else None


def from_subject(subject: str) -> UUID | None:
    match = _SUBJECT.search(subject)
    return _decode(match.group(1)) if match else None


def from_token(token: str) -> UUID | None:
    match = _TOKEN.fullmatch(token.strip())
    return _decode(match.group(1)) if match else None
