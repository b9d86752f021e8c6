"""Erasing a customer's personal data (`inbox forget`): nothing of it stays in the event store
or the read models, the history still replays (live equals rebuilt), and the erasure itself
is recorded. Real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import orjson
from eventsourcing.persistence import Tracking

from adapters.attachments import AttachmentStore
from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer
from inbox.forget import REDACTED, forget_customer
from inbox.ingest import Ingestor
from infra.settings import load_settings
from infra.store import ContactEventRow, open_event_store
from projections.inbox_view import get_customer, list_conversations
from projections.replay import PROJECTIONS, rebuild
from projections.timeline import get_conversation
from tests.integration.test_projections import (
    World,
    active_tables,
    alice_story,
    contact,
    rows,
    world,  # noqa: F401  (the fixture)
)

PERSONAL = (
    "passport",
    "alice@example.com",
    "Alice",
    "+14155550123",
    "We are on it",
    "text of m1",
    "invoice",
)


def _stored_text(w: World) -> str:
    return "\n".join(n.state.decode() for n in w.store.notifications(0, 1_000_000))


def test_forget_erases_the_person_and_keeps_the_history_replayable(
    world: World,  # noqa: F811
    tmp_path: Path,
) -> None:
    conversation = alice_story(world)
    ref = AttachmentStore(tmp_path).put(b"Alice's passport scan")
    attachment = {"name": "passport.pdf", "type": "application/pdf", "size": 21, "ref": ref}
    world.ingest(
        contact(
            "m2",
            14,
            email="alice@example.com",
            payload={"text": "my passport", "attachments": [attachment]},
        ),
        contact("bob1", 20, email="bob@example.com", name="Bob"),
    )
    world.catch_up()
    customer = world.customer_of("email:alice@example.com")
    assert all(p in _stored_text(world) for p in PERSONAL)

    erasure = forget_customer(
        world.store, customer.id, actor="dpo", data_dir=tmp_path, read_models=world.db
    )

    assert erasure.conversations == [str(conversation.id)]
    assert erasure.attachments_deleted == 1
    assert not AttachmentStore(tmp_path).path(ref).exists()
    assert erasure.events_rewritten > 5
    stored = _stored_text(world)
    for personal in PERSONAL:
        assert personal not in stored, personal
    assert "bob@example.com" in stored  # nobody else is touched
    forgotten = world.store.get(customer.id)
    assert isinstance(forgotten, Customer)
    assert forgotten.forgotten
    assert forgotten.name is None
    assert all(i.startswith("forgotten:") for i in forgotten.identities)
    assert isinstance(forgotten.pending_events, list)
    last = world.store.events_of(customer.id)[-1]
    assert isinstance(last, Customer.Forgotten)
    assert last.actor == "dpo"
    # the conversation still replays, with its shape
    replayed = world.store.get(conversation.id)
    assert isinstance(replayed, Conversation)
    assert replayed.status == "open"  # reopened by the passport message
    assert replayed.reopen_count == 1

    world.catch_up()
    shown = get_customer(world.db, str(customer.id))
    assert shown is not None
    assert shown["name"] is None
    assert all(i.startswith("forgotten:") for i in shown["identities"])
    assert list_conversations(world.db, customer="email:alice@example.com", status="all") == {
        "items": [],
        "next": None,
    }
    detail = get_conversation(world.db, str(conversation.id))
    assert detail is not None
    texts = [e["text"] for e in detail["timeline"] if e["text"]]
    assert texts
    assert set(texts) == {REDACTED}

    # live equals rebuilt from the rewritten history
    for name in ("inbox", "timeline"):
        projection = PROJECTIONS[name]()
        live = rows(world.db, active_tables(world.db, projection))
        rebuild(world.store, world.db, name, from_start=True)
        assert rows(world.db, active_tables(world.db, projection)) == live, name


def test_the_forget_command(tmp_path: Path) -> None:
    env = {"INBOX_DATA_DIR": str(tmp_path)}
    settings = load_settings(env)
    store = open_event_store(settings)
    try:
        batch = [(contact("x1", 0, email="carol@example.com", name="Carol"), None)]
        Ingestor(store).apply_batch(
            [(event, ContactEventRow(event.event_id, "t", 0, 0)) for event, _ in batch],
            Tracking("t:0", 1),
        )
        (notification,) = [
            n for n in store.notifications(0, 100) if n.topic.endswith("Customer.Registered")
        ]
        customer_id = notification.originator_id
    finally:
        store.close()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "inbox.cli",
            "forget",
            "--customer",
            str(customer_id),
            "--actor",
            "dpo",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "recorded as Customer.Forgotten" in done.stdout
    store = open_event_store(settings)
    try:
        stored = "\n".join(n.state.decode() for n in store.notifications(0, 100))
    finally:
        store.close()
    assert "carol@example.com" not in stored
    assert "Carol" not in stored
    missing = subprocess.run(
        [sys.executable, "-m", "inbox.cli", "forget", "--customer", str(uuid4())],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert "no customer" in missing.stderr


def test_forget_copes_with_attachments_taken_in_before_they_were_checked(
    world: World,  # noqa: F811
    tmp_path: Path,
) -> None:
    """An attachment that is not an object (the gate refuses those now; older stores may
    hold them) is forgotten too, instead of stopping the timeline."""
    conversation = alice_story(world)
    older = world.store.get(conversation.id)
    assert isinstance(older, Conversation)
    older.receive_message(
        channel="email",
        via=None,
        message_id="<legacy@example.com>",
        text="see the scan",
        subject=None,
        html=None,
        attachments=["passport-scan.pdf"],
        thread_ref=None,
        in_reply_to=[],
        automatic=False,
        source_event_id="legacy-1",
        at="2026-11-27T10:30:00.000000Z",
    )
    world.store.save(older)
    world.catch_up()
    customer = world.customer_of("email:alice@example.com")
    forget_customer(world.store, customer.id, actor="dpo", data_dir=tmp_path, read_models=world.db)
    world.catch_up()
    detail = get_conversation(world.db, str(conversation.id))
    assert detail is not None
    assert "passport-scan.pdf" not in orjson.dumps(detail).decode()
