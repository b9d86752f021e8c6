"""Deterministic ids: the same input always names the same aggregate, so replays and retries
of the same contact event never create a second customer or conversation."""

from __future__ import annotations

from functools import lru_cache
from uuid import UUID, uuid5

_NAMESPACE = UUID("6f1c7a52-3b0e-4c8e-9a55-0c4f6f7d2b10")


@lru_cache(maxsize=200_000)
def claim_id(identity_key: str) -> UUID:
    return uuid5(_NAMESPACE, "identity:" + identity_key)


def customer_id(first_identity_key: str) -> UUID:
    return uuid5(_NAMESPACE, "customer:" + first_identity_key)


def conversation_id(customer: UUID | str, opening_event_id: str) -> UUID:
    return uuid5(_NAMESPACE, f"conversation:{customer}:{opening_event_id}")


def agent_id(agent: str) -> UUID:
    return uuid5(_NAMESPACE, "agent:" + agent)


def queue_id(queue: str) -> UUID:
    return uuid5(_NAMESPACE, "queue:" + queue)
