"""Identity keys: how one customer is recognised across channels (CONTRACT.md).

`email:<lowercased address>`, `phone:<E.164>`, `visitor:<id>`, `<network>:<id>`.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

SOCIAL_NETWORKS = frozenset({"whatsapp", "messenger", "instagram"})
_EMAIL = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+\.[^@\s<>()\[\],;:\".]{2,}\Z")
_ID = re.compile(r"^[A-Za-z0-9._:@+\-]{1,200}\Z")


class InvalidIdentity(ValueError):
    """A raw identity that cannot be turned into a key."""


@lru_cache(maxsize=50_000)
def normalise_email(raw: str) -> str:
    address = raw.strip().lower()
    if len(address) > 320 or not _EMAIL.match(address):
        raise InvalidIdentity(f"not an email address: {raw[:80]!r}")
    return address


@lru_cache(maxsize=50_000)  # parsing with phonenumbers costs ~30 us; customers repeat
def normalise_phone(raw: str, default_region: str | None = None) -> str:
    """E.164, or InvalidIdentity. Without a region the number must start with '+'."""
    text = raw.strip()
    for prefix in ("whatsapp:", "tel:", "sms:"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
    if default_region is None and not text.startswith("+"):
        text = "+" + text if text.isdigit() else text
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidIdentity(f"not a phone number: {raw[:40]!r}") from exc
    # "Possible" (right length for its country), not "valid": validity tables lag behind
    # numbering plans and reject the reserved test ranges (555-01xx, 07700 900xxx).
    if not phonenumbers.is_possible_number(number):
        raise InvalidIdentity(f"not a possible phone number: {raw[:40]!r}")
    canonical = _e164(number)
    # phonenumbers writes some runs of zeros (an all-zero national number, say
    # "+310000000") as a string that reads back as another number: such input names nobody
    # for sure, and a key must stay the same when normalised again.
    if number.national_number == 0 or _e164(phonenumbers.parse(canonical)) != canonical:
        raise InvalidIdentity(f"not a possible phone number: {raw[:40]!r}")
    return canonical


def _e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise_id(raw: str, what: str) -> str:
    value = raw.strip()
    if not _ID.match(value):
        raise InvalidIdentity(f"{what} must be 1-200 characters of [A-Za-z0-9._:@+-]")
    return value


def email_key(address: str) -> str:
    return "email:" + normalise_email(address)


def phone_key(number: str) -> str:
    return "phone:" + normalise_phone(number)


def visitor_key(visitor: str) -> str:
    return "visitor:" + normalise_id(visitor, "visitor id")


def social_key(network: str, social_id: str) -> str:
    net = network.strip().lower()
    if net not in SOCIAL_NETWORKS:
        raise InvalidIdentity(f"unknown social network {network[:40]!r}")
    return f"{net}:{normalise_id(social_id, 'social id')}"


def parse_key(key: str) -> str:
    """Validates and normalises an identity key given as text (for API filters and CLI)."""
    kind, sep, value = key.partition(":")
    if not sep:
        raise InvalidIdentity(f"an identity key is KIND:VALUE, got {key[:80]!r}")
    if kind == "email":
        return email_key(value)
    if kind == "phone":
        return phone_key(value)
    if kind == "visitor":
        return visitor_key(value)
    return social_key(kind, value)
