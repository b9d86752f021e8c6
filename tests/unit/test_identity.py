"""Identity keys: normalisation of emails, phones and ids (inbox/identity.py)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from inbox.identity import (
    InvalidIdentity,
    email_key,
    normalise_email,
    normalise_id,
    normalise_phone,
    parse_key,
    phone_key,
    social_key,
    visitor_key,
)

FUZZ = settings(max_examples=200, deadline=None)


# --------------------------------------------------------------------------- phones


@pytest.mark.parametrize(
    "raw",
    [
        "+14155550123",
        "+1 415 555 0123",
        "+1 (415) 555-0123",
        " +1-415-555-0123 ",
        "whatsapp:+14155550123",
        "WhatsApp:+14155550123",
        "tel:+14155550123",
        "sms:+14155550123",
        "14155550123",
    ],
)
def test_phone_numbers_normalise_to_e164(raw: str) -> None:
    assert normalise_phone(raw) == "+14155550123"


def test_a_uk_test_range_number_is_accepted_as_possible() -> None:
    # 07700 900xxx is reserved for drama: possible but not "valid" in libphonenumber.
    assert normalise_phone("+44 7700 900123") == "+447700900123"


def test_a_national_number_needs_a_region() -> None:
    assert normalise_phone("(415) 555-0123", default_region="US") == "+14155550123"
    assert normalise_phone("07700 900123", default_region="GB") == "+447700900123"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "not a phone number"),
        ("hello", "not a phone number"),
        ("+0", "not a phone number"),
        ("+1 415", "not a possible phone number"),
        ("+1 415 555 01234", "not a possible phone number"),
        ("+1 415 555 0123 4567 8901", "not a phone number"),
        ("+" + "1" * 300, "not a phone number"),
    ],
)
def test_impossible_phone_numbers_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(InvalidIdentity, match=reason):
        normalise_phone(raw)


# --------------------------------------------------------------------------- emails


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice@Example.COM", "alice@example.com"),
        ("  BOB.Smith+tag@Mail.Example.org\n", "bob.smith+tag@mail.example.org"),
    ],
)
def test_emails_are_trimmed_and_lower_cased(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "alice",
        "alice@",
        "@example.com",
        "alice@example",
        "alice@example.c",
        "alice@@example.com",
        "al ice@example.com",
        "Alice <alice@example.com>",
        "alice@example.com,bob@example.com",
        "a" * 310 + "@example.com",
    ],
)
def test_malformed_emails_are_refused(raw: str) -> None:
    with pytest.raises(InvalidIdentity, match="not an email address"):
        normalise_email(raw)


# --------------------------------------------------------------------------- ids and keys


def test_ids_are_trimmed_and_checked() -> None:
    assert normalise_id("  v-123.abc  ", "visitor") == "v-123.abc"
    with pytest.raises(InvalidIdentity, match="visitor must be 1-200 characters"):
        normalise_id("has space", "visitor")
    with pytest.raises(InvalidIdentity, match="visitor"):
        normalise_id("", "visitor")
    with pytest.raises(InvalidIdentity, match="visitor"):
        normalise_id("x" * 201, "visitor")


def test_keys_of_each_kind() -> None:
    assert email_key("Alice@Example.com") == "email:alice@example.com"
    assert phone_key("+1 415 555 0123") == "phone:+14155550123"
    assert visitor_key("v-1") == "visitor:v-1"
    assert social_key("WhatsApp", "14155550123") == "whatsapp:14155550123"
    assert social_key("instagram", "1789") == "instagram:1789"


def test_an_unknown_social_network_is_refused() -> None:
    with pytest.raises(InvalidIdentity, match="unknown social network 'myspace'"):
        social_key("myspace", "1")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("email:Alice@Example.com", "email:alice@example.com"),
        ("phone:+1 415 555 0123", "phone:+14155550123"),
        ("visitor:v-1", "visitor:v-1"),
        ("messenger:2871", "messenger:2871"),
    ],
)
def test_parse_key_normalises(text: str, key: str) -> None:
    assert parse_key(text) == key


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alice@example.com", "KIND:VALUE"),
        ("email:nope", "not an email address"),
        ("phone:12", "phone"),
        ("fax:123", "unknown social network"),
    ],
)
def test_parse_key_refuses(text: str, reason: str) -> None:
    with pytest.raises(InvalidIdentity, match=reason):
        parse_key(text)


# --------------------------------------------------------------------------- properties

_phoneish = st.builds(
    lambda prefix, body: prefix + body,
    st.sampled_from(["", "+", "whatsapp:", "whatsapp:+", "tel:+", "sms:"]),
    st.text(alphabet="+0123456789 -().x٣²", max_size=25),
)


@FUZZ
@given(st.one_of(_phoneish, st.text(max_size=40)))
@example("310000000")  # phonenumbers writes it "+31000000", which reads back as "+3100000"
@example("+3900012")  # leading zeros kept ("italian_leading_zero")
def test_normalise_phone_returns_a_fixed_point_or_refuses(raw: str) -> None:
    try:
        canonical = normalise_phone(raw)
    except InvalidIdentity:
        return
    assert canonical.startswith("+")
    assert canonical[1:].isascii()
    assert canonical[1:].isdigit()
    assert normalise_phone(canonical) == canonical


_local = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+_-")
_emailish = st.builds(
    lambda local, domain, tld, pad: f"{pad}{local}@{domain}.{tld}{pad}",
    _local,
    _local,
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZİ", max_size=5),
    st.sampled_from(["", " ", "\t", "\n"]),
)


@FUZZ
@given(st.one_of(_emailish, st.text(max_size=60)))
def test_normalise_email_returns_a_fixed_point_or_refuses(raw: str) -> None:
    try:
        canonical = normalise_email(raw)
    except InvalidIdentity:
        return
    assert canonical == canonical.lower()
    assert canonical.count("@") == 1
    assert normalise_email(canonical) == canonical


@FUZZ
@given(st.text(max_size=220))
def test_normalise_id_returns_a_fixed_point_or_refuses(raw: str) -> None:
    try:
        canonical = normalise_id(raw, "id")
    except InvalidIdentity:
        return
    assert normalise_id(canonical, "id") == canonical


@FUZZ
@given(st.text(max_size=60))
def test_parse_key_returns_a_fixed_point_or_refuses(raw: str) -> None:
    try:
        key = parse_key(raw)
    except InvalidIdentity:
        return
    assert parse_key(key) == key
