"""The lean event path of `inbox/domain/base.py`, given / when / then: an event built without
the frozen dataclass's `__init__` is the event the dataclass would build, a call the dataclass
would refuse is still refused, and the lean constructors the ingest worker uses create the
same aggregates and events as the generic ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.domain.base import new_event
from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer, IdentityClaim

T0 = "2026-11-27T10:00:00.000000Z"
WHEN = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def _fields(event: Any) -> dict[str, Any]:
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


def _comparable(events: Sequence[Any]) -> list[tuple[type[Any], dict[str, Any]]]:
    """Events without their timestamps (each path reads the clock itself)."""
    return [(type(e), {k: v for k, v in _fields(e).items() if k != "timestamp"}) for e in events]


def _message(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "originator_id": uuid4(),
        "originator_version": 2,
        "timestamp": WHEN,
        "channel": "sms",
        "via": None,
        "message_id": "SM1",
        "text": "hello",
        "subject": None,
        "html": None,
        "attachments": [],
        "thread_ref": None,
        "in_reply_to": [],
        "automatic": False,
        "source_event_id": "e-1",
        "at": T0,
    }
    values.update(overrides)
    return values


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=50),
    via=st.none() | st.text(max_size=20),
    automatic=st.booleans(),
    version=st.integers(min_value=1, max_value=10**6),
    in_reply_to=st.lists(st.text(max_size=10), max_size=3),
)
def test_a_lean_event_equals_the_dataclass_one(
    text: str, via: str | None, automatic: bool, version: int, in_reply_to: list[str]
) -> None:
    # given the values of a message event
    values = _message(
        text=text, via=via, automatic=automatic, originator_version=version, in_reply_to=in_reply_to
    )
    # when it is built both ways
    lean = new_event(Conversation.MessageReceived, dict(values))
    built = Conversation.MessageReceived(**values)
    # then they are equal, field by field, and the lean one holds nothing else
    assert type(lean) is Conversation.MessageReceived
    assert lean == built
    assert _fields(lean) == _fields(built)
    assert vars(lean).keys() == vars(built).keys()


def test_a_lean_event_stays_frozen() -> None:
    # given a lean event
    event = new_event(Conversation.MessageReceived, _message())
    # when a field is assigned, then the dataclass refuses, as for any event
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.text = "changed"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda v: v.pop("text"), "text"),
        (lambda v: v.update(unexpected=1), "unexpected"),
    ],
)
def test_values_the_dataclass_would_refuse_are_refused(change: Any, complaint: str) -> None:
    # given message values with a field missing or one too many
    values = _message()
    change(values)
    # when the event is built, then the dataclass's own check refuses it
    with pytest.raises(TypeError, match=complaint):
        new_event(Conversation.MessageReceived, values)


def test_a_non_uuid_originator_is_refused_through_the_dataclass() -> None:
    # given values that name every field but carry a text originator id
    values = _message(originator_id="c-1")
    # when built lean, then it is refused as the dataclass refuses it
    with pytest.raises(TypeError, match="non-UUID originator_id"):
        new_event(Conversation.MessageReceived, values)


def test_register_creates_what_the_generic_constructor_creates() -> None:
    # given / when a customer made both ways
    lean = Customer.register(["email:a@example.com", "phone:+14155550123"], "Ann", T0)
    generic = Customer(identities=["email:a@example.com", "phone:+14155550123"], name="Ann", at=T0)
    # then the id, state and events match
    assert lean.id == generic.id
    assert lean.identities == generic.identities
    assert lean.name == generic.name
    assert _comparable(lean.collect_events()) == _comparable(generic.collect_events())


def test_claim_creates_what_the_generic_constructor_creates() -> None:
    lean = IdentityClaim.claim("email:a@example.com", "c-1", T0)
    generic = IdentityClaim(key="email:a@example.com", customer_id="c-1", at=T0)
    assert lean.id == generic.id
    assert lean.customer_id == generic.customer_id
    assert _comparable(lean.collect_events()) == _comparable(generic.collect_events())


def test_open_creates_what_the_generic_constructor_creates() -> None:
    fields: dict[str, Any] = {
        "customer_id": "c-1",
        "channel": "email",
        "queue": None,
        "previous": "c-0",
        "source_event_id": "e-1",
        "at": T0,
    }
    lean = Conversation.open(**fields)
    generic = Conversation(**fields)
    assert lean.id == generic.id
    assert vars(lean).keys() == vars(generic).keys()
    assert _comparable(lean.collect_events()) == _comparable(generic.collect_events())


def test_an_event_triggered_after_creation_gets_the_next_version() -> None:
    # given a registered customer
    customer = Customer.register(["email:a@example.com"], None, T0)
    # when they learn a name
    customer.learn_name("Ann", T0)
    # then the second event is version 2, with exactly its fields
    registered, learned = customer.collect_events()
    assert (registered.originator_version, learned.originator_version) == (1, 2)
    assert isinstance(learned, Customer.NameLearned)
    assert _fields(learned)["name"] == "Ann"
    assert customer.version == 2
