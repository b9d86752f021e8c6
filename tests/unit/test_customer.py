"""The Customer and IdentityClaim aggregates, given / when / then: identities, names,
conversations, merging two customers and undoing it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any
from uuid import UUID

import pytest

from inbox.domain import ids
from inbox.domain.customer import Customer, IdentityClaim
from inbox.domain.errors import CustomerMergeError

Expected = Sequence[tuple[type[Any], dict[str, Any]]]

T0 = "2026-11-27T10:00:00.000000Z"
T1 = "2026-11-27T10:05:00.000000Z"
T2 = "2026-11-27T10:10:00.000000Z"
T3 = "2026-11-27T10:15:00.000000Z"

ALICE_EMAIL = "email:alice@example.com"
ALICE_PHONE = "phone:+14155550123"
BOB_EMAIL = "email:bob@example.com"
CAROL_EMAIL = "email:carol@example.com"
CONV_A = ids.conversation_id("a", "evt-a")
CONV_B = ids.conversation_id("b", "evt-b")


def _state(aggregate: Any) -> dict[str, Any]:
    """A deep copy of the aggregate's state (lists inside it change in place)."""
    return copy.deepcopy({k: v for k, v in vars(aggregate).items() if k != "_pending_events"})


class History:
    """Aggregates and every event each recorded, so each can be rebuilt and compared."""

    def __init__(self) -> None:
        self.events: dict[UUID, list[Any]] = {}
        self.aggregates: dict[UUID, Any] = {}

    def track(self, *aggregates: Any) -> list[Any]:
        """Moves the pending events of `aggregates` into the history; returns them, in order."""
        new: list[Any] = []
        for aggregate in aggregates:
            self.aggregates[aggregate.id] = aggregate
            pending = aggregate.collect_events()
            self.events.setdefault(aggregate.id, []).extend(pending)
            new.extend(pending)
        for aggregate in aggregates:
            rebuilt = reduce(lambda a, e: e.mutate(a), self.events[aggregate.id], None)
            assert _state(rebuilt) == _state(aggregate)
        return new


def customer(history: History, *identities: str, name: str | None = None) -> Customer:
    created = Customer(identities=list(identities), name=name, at=T0)
    history.track(created)
    return created


def with_conversation(history: History, who: Customer, conversation: UUID) -> Customer:
    who.start_conversation(conversation, T0)
    history.track(who)
    return who


def assert_events(events: Sequence[Any], expected: Expected) -> None:
    assert [type(e) for e in events] == [kind for kind, _ in expected]
    for event, (_, fields) in zip(events, expected, strict=True):
        assert {name: getattr(event, name) for name in fields} == fields


def refused(history: History, command: Callable[[], object], match: str, *who: Any) -> None:
    before = [_state(a) for a in who]
    with pytest.raises(CustomerMergeError, match=match):
        command()
    assert [a.pending_events for a in who] == [[] for _ in who]
    assert [_state(a) for a in who] == before


# --------------------------------------------------------------------------- customer


def test_a_customer_is_registered_under_their_first_identity() -> None:
    history = History()
    alice = Customer(identities=[ALICE_EMAIL, ALICE_PHONE], name="Alice", at=T0)
    assert_events(
        history.track(alice),
        [
            (
                Customer.Registered,
                {
                    "identities": [ALICE_EMAIL, ALICE_PHONE],
                    "name": "Alice",
                    "at": T0,
                    "originator_version": 1,
                },
            )
        ],
    )
    assert alice.id == ids.customer_id(ALICE_EMAIL)
    assert alice.identities == [ALICE_EMAIL, ALICE_PHONE]
    assert alice.conversations == []
    assert alice.current_conversation_id is None
    assert alice.merged_into is None
    assert alice.absorbed == {}


def test_the_same_first_identity_names_the_same_customer() -> None:
    assert Customer.create_id([ALICE_EMAIL]) == Customer.create_id([ALICE_EMAIL, ALICE_PHONE])
    assert Customer.create_id([ALICE_EMAIL]) != Customer.create_id([ALICE_PHONE])


def test_an_identity_is_added_once() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    alice.add_identity(ALICE_PHONE, T1, reason="came with email in contact event e1")
    assert_events(
        history.track(alice),
        [
            (
                Customer.IdentityAdded,
                {
                    "identity": ALICE_PHONE,
                    "reason": "came with email in contact event e1",
                    "at": T1,
                },
            )
        ],
    )
    assert alice.identities == [ALICE_EMAIL, ALICE_PHONE]

    alice.add_identity(ALICE_PHONE, T2, reason="test")
    alice.add_identity(ALICE_EMAIL, T2, reason="test")
    assert history.track(alice) == []


def test_a_name_is_learned_only_when_there_is_none() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    alice.learn_name(None, T1)
    alice.learn_name("", T1)
    assert history.track(alice) == []

    alice.learn_name("Alice", T1)
    assert_events(history.track(alice), [(Customer.NameLearned, {"name": "Alice", "at": T1})])

    alice.learn_name("Alicia", T2)
    assert history.track(alice) == []
    assert alice.name == "Alice"


def test_the_last_conversation_started_is_the_current_one() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    alice.start_conversation(CONV_A, T1)
    assert_events(
        history.track(alice),
        [(Customer.ConversationStarted, {"conversation_id": str(CONV_A), "at": T1})],
    )
    alice.start_conversation(CONV_B, T2)
    history.track(alice)
    assert alice.conversations == [str(CONV_A), str(CONV_B)]
    assert alice.current_conversation_id == str(CONV_B)


# --------------------------------------------------------------------------- identity claim


def test_an_identity_is_claimed_for_a_customer() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    claim = IdentityClaim(key=ALICE_EMAIL, customer_id=str(alice.id), at=T0)
    assert_events(
        history.track(claim),
        [
            (
                IdentityClaim.Claimed,
                {"key": ALICE_EMAIL, "customer_id": str(alice.id), "at": T0},
            )
        ],
    )
    assert claim.id == ids.claim_id(ALICE_EMAIL)
    assert claim.customer_id == str(alice.id)


def test_a_claim_is_reassigned_only_to_another_customer() -> None:
    history = History()
    claim = IdentityClaim(key=ALICE_PHONE, customer_id="a", at=T0)
    history.track(claim)

    claim.reassign("a", reason="merge", actor="sup", at=T1)
    assert history.track(claim) == []

    claim.reassign("b", reason="merge", actor="sup", at=T1)
    assert_events(
        history.track(claim),
        [
            (
                IdentityClaim.Reassigned,
                {"customer_id": "b", "reason": "merge", "actor": "sup", "at": T1},
            )
        ],
    )
    assert claim.customer_id == "b"


# --------------------------------------------------------------------------- merge


def test_a_merge_moves_identities_and_conversations_to_the_survivor() -> None:
    history = History()
    alice = with_conversation(history, customer(history, ALICE_EMAIL), CONV_A)
    phone = with_conversation(history, customer(history, ALICE_PHONE), CONV_B)

    alice.absorb(phone, actor="sup", at=T1)

    assert_events(
        history.track(alice, phone),
        [
            (
                Customer.Merged,
                {
                    "other": str(phone.id),
                    "identities": [ALICE_PHONE],
                    "conversations": [str(CONV_B)],
                    "actor": "sup",
                    "at": T1,
                },
            ),
            (Customer.MergedInto, {"target": str(alice.id), "actor": "sup", "at": T1}),
        ],
    )
    assert alice.identities == [ALICE_EMAIL, ALICE_PHONE]
    # The absorbed conversations become earlier ones; the survivor's stays current.
    assert alice.conversations == [str(CONV_B), str(CONV_A)]
    assert alice.current_conversation_id == str(CONV_A)
    assert alice.absorbed_from(ALICE_PHONE) == str(phone.id)
    assert alice.absorbed_from(ALICE_EMAIL) is None
    assert phone.merged_into == str(alice.id)


def test_merging_a_customer_without_conversations() -> None:
    history = History()
    alice = with_conversation(history, customer(history, ALICE_EMAIL), CONV_A)
    phone = customer(history, ALICE_PHONE)
    alice.absorb(phone, actor="sup", at=T1)
    history.track(alice, phone)
    assert alice.conversations == [str(CONV_A)]
    assert alice.current_conversation_id == str(CONV_A)


def test_the_claims_follow_a_merge_and_its_undoing() -> None:
    """What the application does around a merge: every claim of the absorbed identities
    points at the survivor, and back at the restored customer after an undo."""
    history = History()
    alice = customer(history, ALICE_EMAIL)
    phone = customer(history, ALICE_PHONE)
    claims = {
        key: IdentityClaim(key=key, customer_id=str(owner.id), at=T0)
        for key, owner in ((ALICE_EMAIL, alice), (ALICE_PHONE, phone))
    }
    history.track(*claims.values())

    alice.absorb(phone, actor="sup", at=T1)
    history.track(alice, phone)
    for key in phone.identities:
        claims[key].reassign(str(alice.id), reason="merge", actor="sup", at=T1)
    assert_events(
        history.track(*claims.values()),
        [(IdentityClaim.Reassigned, {"customer_id": str(alice.id), "reason": "merge"})],
    )

    returned = alice.undo_merge(phone, actor="sup", at=T2)
    history.track(alice, phone)
    for key in returned:
        claims[key].reassign(str(phone.id), reason="merge undone", actor="sup", at=T2)
    assert_events(
        history.track(*claims.values()),
        [(IdentityClaim.Reassigned, {"customer_id": str(phone.id), "reason": "merge undone"})],
    )
    assert claims[ALICE_EMAIL].customer_id == str(alice.id)
    assert claims[ALICE_PHONE].customer_id == str(phone.id)


def test_a_customer_cannot_be_merged_into_itself() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    refused(
        history,
        lambda: alice.absorb(alice, actor="sup", at=T1),
        "a customer cannot be merged with itself",
        alice,
    )


def test_the_same_customer_loaded_twice_cannot_be_merged_into_itself() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    again = reduce(lambda a, e: e.mutate(a), history.events[alice.id], None)
    assert isinstance(again, Customer)
    refused(
        history,
        lambda: alice.absorb(again, actor="sup", at=T1),
        "a customer cannot be merged with itself",
        alice,
        again,
    )


def test_a_customer_already_merged_away_cannot_be_merged_again() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    carol = customer(history, CAROL_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    history.track(alice, bob)

    refused(
        history,
        lambda: carol.absorb(bob, actor="sup", at=T2),
        "a customer that was merged into another cannot merge",
        carol,
        bob,
    )
    refused(
        history,
        lambda: alice.absorb(bob, actor="sup", at=T2),
        "a customer that was merged into another cannot merge",
        alice,
        bob,
    )


def test_a_customer_merged_away_cannot_absorb_another() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    carol = customer(history, CAROL_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    history.track(alice, bob)
    refused(
        history,
        lambda: bob.absorb(carol, actor="sup", at=T2),
        "a customer that was merged into another cannot merge",
        bob,
        carol,
    )


def test_a_survivor_can_absorb_several_customers() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = with_conversation(history, customer(history, BOB_EMAIL), CONV_B)
    carol = customer(history, CAROL_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    alice.absorb(carol, actor="sup", at=T2)
    history.track(alice, bob, carol)
    assert alice.identities == [ALICE_EMAIL, BOB_EMAIL, CAROL_EMAIL]
    assert alice.absorbed_from(CAROL_EMAIL) == str(carol.id)
    assert alice.absorbed_from(BOB_EMAIL) == str(bob.id)


# --------------------------------------------------------------------------- undo


def test_undoing_a_merge_gives_back_what_the_customer_brought() -> None:
    history = History()
    alice = with_conversation(history, customer(history, ALICE_EMAIL), CONV_A)
    phone = with_conversation(history, customer(history, ALICE_PHONE), CONV_B)
    before_alice, before_phone = _state(alice), _state(phone)
    alice.absorb(phone, actor="sup", at=T1)
    history.track(alice, phone)

    returned = alice.undo_merge(phone, actor="sup", at=T2)

    assert returned == [ALICE_PHONE]
    assert_events(
        history.track(alice, phone),
        [
            (
                Customer.MergeUndone,
                {
                    "other": str(phone.id),
                    "identities": [ALICE_PHONE],
                    "conversations": [str(CONV_B)],
                    "actor": "sup",
                    "at": T2,
                },
            ),
            (Customer.Restored, {"actor": "sup", "at": T2}),
        ],
    )
    assert alice.identities == [ALICE_EMAIL]
    assert alice.conversations == [str(CONV_A)]
    assert alice.absorbed == {}
    assert alice.absorbed_from(ALICE_PHONE) is None
    assert phone.merged_into is None
    assert phone.identities == [ALICE_PHONE]
    assert phone.conversations == [str(CONV_B)]
    # Everything but the version and modification time is as before the merge.
    changing = ("_version", "_modified_on")
    assert {k: v for k, v in _state(alice).items() if k not in changing} == {
        k: v for k, v in before_alice.items() if k not in changing
    }
    assert {k: v for k, v in _state(phone).items() if k not in changing} == {
        k: v for k, v in before_phone.items() if k not in changing
    }


def test_what_the_survivor_gained_after_the_merge_stays_after_an_undo() -> None:
    history = History()
    alice = with_conversation(history, customer(history, ALICE_EMAIL), CONV_A)
    phone = with_conversation(history, customer(history, ALICE_PHONE), CONV_B)
    alice.absorb(phone, actor="sup", at=T1)
    later = ids.conversation_id("a", "evt-later")
    alice.start_conversation(later, T2)
    alice.add_identity(BOB_EMAIL, T2, reason="test")
    history.track(alice, phone)

    alice.undo_merge(phone, actor="sup", at=T3)
    history.track(alice, phone)

    assert alice.identities == [ALICE_EMAIL, BOB_EMAIL]
    assert alice.conversations == [str(CONV_A), str(later)]
    assert alice.current_conversation_id == str(later)


def test_undoing_one_merge_keeps_the_others() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    carol = customer(history, CAROL_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    alice.absorb(carol, actor="sup", at=T1)
    alice.undo_merge(bob, actor="sup", at=T2)
    history.track(alice, bob, carol)
    assert alice.identities == [ALICE_EMAIL, CAROL_EMAIL]
    assert list(alice.absorbed) == [str(carol.id)]
    assert bob.merged_into is None
    assert carol.merged_into == str(alice.id)


def test_a_customer_can_be_merged_again_after_an_undo() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    alice.undo_merge(bob, actor="sup", at=T2)
    alice.absorb(bob, actor="sup", at=T3)
    history.track(alice, bob)
    assert alice.identities == [ALICE_EMAIL, BOB_EMAIL]
    assert bob.merged_into == str(alice.id)


def test_undoing_a_merge_that_never_happened_is_refused() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    refused(
        history,
        lambda: alice.undo_merge(bob, actor="sup", at=T1),
        "that customer was not merged into this one",
        alice,
        bob,
    )


def test_undoing_a_merge_into_another_customer_is_refused() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    carol = customer(history, CAROL_EMAIL)
    carol.absorb(bob, actor="sup", at=T1)
    history.track(carol, bob)
    refused(
        history,
        lambda: alice.undo_merge(bob, actor="sup", at=T2),
        "that customer was not merged into this one",
        alice,
        bob,
    )


def test_undoing_a_merge_twice_is_refused() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    alice.undo_merge(bob, actor="sup", at=T2)
    history.track(alice, bob)
    refused(
        history,
        lambda: alice.undo_merge(bob, actor="sup", at=T3),
        "that customer was not merged into this one",
        alice,
        bob,
    )


def test_a_customer_merged_away_cannot_undo_its_own_merges() -> None:
    history = History()
    alice = customer(history, ALICE_EMAIL)
    bob = customer(history, BOB_EMAIL)
    carol = customer(history, CAROL_EMAIL)
    alice.absorb(bob, actor="sup", at=T1)
    carol.absorb(alice, actor="sup", at=T2)
    history.track(alice, bob, carol)
    assert carol.identities == [CAROL_EMAIL, ALICE_EMAIL, BOB_EMAIL]
    refused(
        history,
        lambda: alice.undo_merge(bob, actor="sup", at=T3),
        "merged into another",
        alice,
        bob,
    )


def test_every_event_carries_a_class_version() -> None:
    kinds = [
        value
        for aggregate in (Customer, IdentityClaim)
        for name, value in vars(aggregate).items()
        if isinstance(value, type)
        and issubclass(value, aggregate.Event)
        and name not in ("Event", "Created")
    ]
    assert len(kinds) == 12
    versions = {kind.__qualname__: getattr(kind, "class_version", None) for kind in kinds}
    assert versions.pop("Customer.IdentityAdded") == 2  # reason added; v1 is upcast
    assert set(versions.values()) == {1}
