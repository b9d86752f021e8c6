"""The customer: every identity we know them by, and their conversations.

Identity ownership lives in one `IdentityClaim` aggregate per identity key, so that two
workers racing to register the same email or phone collide on the claim's first version
(the store refuses one) instead of creating two customers.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from inbox.domain import ids
from inbox.domain.base import DomainAggregate
from inbox.domain.errors import CustomerMergeError


class IdentityClaim(DomainAggregate):
    """Which customer an identity key (`email:...`, `phone:...`) belongs to."""

    class Claimed(Aggregate.Created):
        class_version = 1
        key: str
        customer_id: str
        at: str

    class Reassigned(Aggregate.Event):
        class_version = 1
        customer_id: str
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.customer_id = self.customer_id

    @staticmethod
    def create_id(key: str) -> UUID:
        return ids.claim_id(key)

    @classmethod
    def claim(cls, key: str, customer_id: str, at: str) -> IdentityClaim:
        """`IdentityClaim(key=..., customer_id=..., at=...)` without the metaclass's generic
        argument handling (the ingest worker claims about one identity per new customer)."""
        return cls._create(
            cls.Claimed, id=ids.claim_id(key), key=key, customer_id=customer_id, at=at
        )

    def __init__(self, key: str, customer_id: str, at: str) -> None:
        self.key = key
        self.customer_id = customer_id

    def reassign(self, customer_id: str, *, reason: str, actor: str, at: str) -> None:
        if customer_id != self.customer_id:
            self.trigger_event(
                self.Reassigned, customer_id=customer_id, reason=reason, actor=actor, at=at
            )


class Customer(DomainAggregate):
    class Registered(Aggregate.Created):
        class_version = 1
        identities: list[str]
        name: str | None
        at: str

    class IdentityAdded(Aggregate.Event):
        """`reason` says why the identity is this customer's (v2), e.g. that it came in the
        same contact event as one already known, with that event's id."""

        class_version = 2
        identity: str
        reason: str
        at: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["reason"] = "linked before reasons were recorded"

        def apply(self, aggregate: Any) -> None:
            aggregate.identities.append(self.identity)

    class NameLearned(Aggregate.Event):
        class_version = 1
        name: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.name = self.name

    class ConversationStarted(Aggregate.Event):
        class_version = 1
        conversation_id: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.conversations.append(self.conversation_id)

    class Merged(Aggregate.Event):
        """This customer absorbed `other`: its identities and conversations are now ours."""

        class_version = 1
        other: str
        identities: list[str]
        conversations: list[str]
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.absorbed[self.other] = (list(self.identities), list(self.conversations))
            aggregate.identities.extend(self.identities)
            # Ours stay current: the absorbed ones become earlier conversations.
            aggregate.conversations[:0] = self.conversations

    class MergedInto(Aggregate.Event):
        class_version = 1
        target: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.merged_into = self.target

    class MergeUndone(Aggregate.Event):
        """`other`, absorbed earlier, is separate again with what it brought."""

        class_version = 1
        other: str
        identities: list[str]
        conversations: list[str]
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            del aggregate.absorbed[self.other]
            aggregate.identities = [i for i in aggregate.identities if i not in self.identities]
            gone = set(self.conversations)
            aggregate.conversations = [c for c in aggregate.conversations if c not in gone]

    class Restored(Aggregate.Event):
        class_version = 1
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.merged_into = None

    class VipChanged(Aggregate.Event):
        """VIP customers wait in the escalation queues and get a higher priority."""

        class_version = 1
        vip: bool
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.vip = self.vip

    class Forgotten(Aggregate.Event):
        """Personal data erased (a subject's request): the customer's and their conversations'
        events were rewritten with placeholders; `identities` are the pseudonyms that replaced
        the identity keys (so merges and claims still replay); `conversations` the ones it
        touched, for the projections to erase what they show."""

        class_version = 1
        identities: list[str]
        conversations: list[str]
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.name = None
            aggregate.identities = list(self.identities)
            aggregate.forgotten = True

    @staticmethod
    def create_id(identities: list[str]) -> UUID:
        return ids.customer_id(identities[0])

    @classmethod
    def register(cls, identities: list[str], name: str | None, at: str) -> Customer:
        """`Customer(identities=..., name=..., at=...)` without the metaclass's generic
        argument handling."""
        return cls._create(
            cls.Registered,
            id=ids.customer_id(identities[0]),
            identities=identities,
            name=name,
            at=at,
        )

    def __init__(self, identities: list[str], name: str | None, at: str) -> None:
        self.identities = list(identities)
        self.name = name
        self.conversations: list[str] = []
        self.merged_into: str | None = None
        self.vip = False
        self.forgotten = False
        # other customer id -> (identities, conversations) it brought, so a merge can be undone.
        self.absorbed: dict[str, tuple[list[str], list[str]]] = {}

    @property
    def current_conversation_id(self) -> str | None:
        return self.conversations[-1] if self.conversations else None

    def set_vip(self, vip: bool, *, actor: str, at: str) -> None:
        if vip != self.vip:
            self.trigger_event(self.VipChanged, vip=vip, actor=actor, at=at)

    def add_identity(self, identity: str, at: str, *, reason: str) -> None:
        if identity not in self.identities:
            self.trigger_event(self.IdentityAdded, identity=identity, reason=reason, at=at)

    def learn_name(self, name: str | None, at: str) -> None:
        if name and not self.name:
            self.trigger_event(self.NameLearned, name=name, at=at)

    def start_conversation(self, conversation_id: UUID, at: str) -> None:
        self.trigger_event(self.ConversationStarted, conversation_id=str(conversation_id), at=at)

    def absorb(self, other: Customer, *, actor: str, at: str) -> None:
        """Merge `other` into this customer; `other` must record `merged_into` in turn."""
        if other.id == self.id:
            raise CustomerMergeError("a customer cannot be merged with itself")
        if self.merged_into is not None or other.merged_into is not None:
            raise CustomerMergeError("a customer that was merged into another cannot merge")
        self.trigger_event(
            self.Merged,
            other=str(other.id),
            identities=list(other.identities),
            conversations=list(other.conversations),
            actor=actor,
            at=at,
        )
        other.trigger_event(other.MergedInto, target=str(self.id), actor=actor, at=at)

    def absorbed_from(self, identity: str) -> str | None:
        """The customer a merge brought `identity` from, if any."""
        for other, (identities, _) in self.absorbed.items():
            if identity in identities:
                return other
        return None

    def undo_merge(self, other: Customer, *, actor: str, at: str) -> list[str]:
        """Separates `other` again; returns the identities that go back to it."""
        key = str(other.id)
        if self.merged_into is not None:
            raise CustomerMergeError("this customer was merged into another: undo that first")
        if key not in self.absorbed or other.merged_into != str(self.id):
            raise CustomerMergeError("that customer was not merged into this one")
        identities, conversations = self.absorbed[key]
        self.trigger_event(
            self.MergeUndone,
            other=key,
            identities=identities,
            conversations=conversations,
            actor=actor,
            at=at,
        )
        other.trigger_event(other.Restored, actor=actor, at=at)
        return identities
