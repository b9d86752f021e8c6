"""Stored snapshots against the real event store (SQLite and PostgreSQL): an aggregate loads
from its latest snapshot and the events after it and equals a full replay; a snapshot taken by
other domain code, or of a state JSON would change, is never used; erasing a customer's
personal data deletes their snapshots too."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore

from inbox.agents import Directory, agent_profile
from inbox.domain import ids
from inbox.domain.agent import Agent
from inbox.forget import forget_customer
from inbox.ingest import Ingestor
from infra.snapshots import SNAPSHOT_EVERY
from infra.store import ContactEventRow, EventStore
from tests.integration.test_forget import PERSONAL
from tests.integration.test_projections import (
    World,
    alice_story,
    contact,
    world,  # noqa: F401  (the fixture)
)

AGENT = "actor:agent:ann"


def _sql(store: EventStore, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Runs one statement in its own transaction ("?" placeholders on either database)."""
    if isinstance(store.datastore, PostgresDatastore):
        with store.datastore.transaction(commit=True) as curs:
            curs.execute(statement.replace("?", "%s"), params)
            return [tuple(row.values()) for row in curs.fetchall()] if curs.description else []
    with store.datastore.transaction(commit=True) as c:
        c.execute(statement, params)
        return [tuple(row) for row in c.fetchall()]


def _key(store: EventStore, aggregate_id: UUID) -> object:
    return aggregate_id if isinstance(store.datastore, PostgresDatastore) else aggregate_id.hex


def _snapshot_rows(store: EventStore, aggregate_id: UUID) -> list[tuple[int, bytes]]:
    rows = _sql(
        store,
        f"SELECT originator_version, state FROM {store.snapshots.table} "
        "WHERE originator_id = ? ORDER BY originator_version",
        (_key(store, aggregate_id),),
    )
    return [(int(version), bytes(state)) for version, state in rows]


def _replayed(store: EventStore, aggregate_id: UUID) -> Any:
    """The aggregate from every one of its events, as before snapshots."""
    aggregate = None
    for event in store.events_of(aggregate_id):
        aggregate = event.mutate(aggregate)
    return aggregate


def _state(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def _agent_with_changes(store: EventStore, changes: int) -> UUID:
    directory = Directory(store, admin_token="admin")
    directory.register("ann", agent_profile({"name": "Ann", "role": "agent"}), actor="admin")
    for n in range(changes):
        status = "available" if n % 2 == 0 else "away"
        directory.set_presence("ann", status, reason="set by agent", actor=AGENT)
    return ids.agent_id("ann")


def test_a_long_aggregate_loads_from_its_latest_snapshot(
    store: EventStore,
) -> None:
    agent_id = _agent_with_changes(store, 2 * SNAPSHOT_EVERY + 50)  # versions 1..251

    assert [version for version, _ in _snapshot_rows(store, agent_id)] == [100, 200]
    loaded = store.get(agent_id)
    assert isinstance(loaded, Agent)
    assert loaded.version == 2 * SNAPSHOT_EVERY + 51
    assert _state(loaded) == _state(_replayed(store, agent_id))

    # Without the events the snapshot covers, the aggregate still loads whole: it came from
    # the snapshot, not from them.
    table = store.recorder.events_table_name  # type: ignore[attr-defined]
    _sql(
        store,
        f"DELETE FROM {table} WHERE originator_id = ? AND originator_version <= ?",
        (_key(store, agent_id), 200),
    )
    again = store.get(agent_id)
    assert _state(again) == _state(loaded)
    # and it goes on recording from there
    Directory(store, admin_token="admin").set_presence(
        "ann", "offline", reason="set by agent", actor=AGENT
    )
    assert store.get(agent_id).presence == "offline"


def test_the_ingest_worker_snapshots_what_its_batches_move_past_a_multiple(
    world: World,  # noqa: F811
) -> None:
    # A long chat: one conversation, 280 messages, taken in 70 to a batch.
    for batch in range(4):
        world.ingest(
            *(
                contact(f"m{n}", n, channel="chat", email="bob@example.com")
                for n in range(batch * 70, (batch + 1) * 70)
            )
        )
    conversation_id = world.conversation_of("email:bob@example.com").id

    # Version 1 opened it; each batch's snapshot is of the version the batch left.
    assert [version for version, _ in _snapshot_rows(world.store, conversation_id)] == [
        141,
        211,
    ]
    loaded = world.store.get(conversation_id)
    assert loaded.version == 281
    assert _state(loaded) == _state(_replayed(world.store, conversation_id))

    # A worker that starts afresh loads it from the snapshot and goes on.
    Ingestor(world.store).apply_batch(
        [
            (
                contact("m280", 280, channel="chat", email="bob@example.com"),
                ContactEventRow("m280", "contact-events", 0, world.offset),
            )
        ],
        Tracking("contact-events:0", world.offset + 1),
    )
    again = world.store.get(conversation_id)
    assert again.version == 282
    assert _state(again) == _state(_replayed(world.store, conversation_id))


def test_a_snapshot_taken_by_other_domain_code_is_not_used(
    store: EventStore,
) -> None:
    agent_id = _agent_with_changes(store, SNAPSHOT_EVERY)
    [(_, state)] = _snapshot_rows(store, agent_id)
    stored = orjson.loads(state)
    stored["state"]["name"] = "Not Ann"
    _sql(
        store,
        f"UPDATE {store.snapshots.table} SET state = ? WHERE originator_id = ?",
        (orjson.dumps(stored), _key(store, agent_id)),
    )
    assert store.get(agent_id).name == "Not Ann"  # this code's snapshot is used...

    stored["code"] = "0123456789abcdef"  # ...one taken by other domain code is not
    _sql(
        store,
        f"UPDATE {store.snapshots.table} SET state = ? WHERE originator_id = ?",
        (orjson.dumps(stored), _key(store, agent_id)),
    )
    loaded = store.get(agent_id)
    assert loaded.name == "Ann"
    assert _state(loaded) == _state(_replayed(store, agent_id))


def test_an_unreadable_snapshot_is_ignored(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    agent_id = _agent_with_changes(store, SNAPSHOT_EVERY)
    for garbage in (b"not json", b'{"code": "x"', b"[]", b"{}"):
        _sql(
            store,
            f"UPDATE {store.snapshots.table} SET state = ? WHERE originator_id = ?",
            (garbage, _key(store, agent_id)),
        )
        caplog.clear()
        loaded = store.get(agent_id)
        assert _state(loaded) == _state(_replayed(store, agent_id))
        assert "unreadable snapshot" in caplog.text


def test_a_state_json_would_change_is_not_snapshotted(world: World) -> None:  # noqa: F811
    world.ingest(
        contact("m1", 0, email="alice@example.com", name="Alice"),
        contact("m2", 1, phone="+14155550123", name="Alice"),
    )
    world.merge("email:alice@example.com", "phone:+14155550123")
    survivor = world.customer_of("email:alice@example.com")
    assert survivor.absorbed  # what the merge keeps for an undo holds tuples
    assert not world.store.snapshots.take(survivor)
    assert _snapshot_rows(world.store, survivor.id) == []

    [absorbed_id] = survivor.absorbed
    before = world.store.get(UUID(absorbed_id))  # the absorbed one: plain JSON state
    assert world.store.snapshots.take(before)
    assert not world.store.snapshots.take(before)  # the same version again: already there
    assert _state(world.store.get(before.id)) == _state(_replayed(world.store, before.id))


def test_forgetting_a_customer_deletes_their_snapshots(world: World) -> None:  # noqa: F811
    conversation = alice_story(world)
    customer = world.customer_of("email:alice@example.com")
    for aggregate in (customer, world.store.get(conversation.id)):
        assert world.store.snapshots.take(aggregate)
    assert "Alice" in _snapshot_rows(world.store, customer.id)[0][1].decode()

    forget_customer(world.store, customer.id, actor="actor:admin:root")

    for aggregate_id in (customer.id, conversation.id):
        for _, state in _snapshot_rows(world.store, aggregate_id):
            assert not any(text in state.decode() for text in PERSONAL)
    erased = world.store.get(customer.id)
    assert erased.forgotten
    assert erased.name != "Alice"
    assert _state(erased) == _state(_replayed(world.store, customer.id))
