"""The routing process's saved state, against the real event store and read-model database
(SQLite and PostgreSQL): a restart takes up the state saved with a log position and reads only
the log after it, ending exactly where a process that never stopped would be; a state of other
code, other router settings, a position the store does not have, or anything that is not such
a state is not used (and builds nothing but this project's classes); the process saves when it
stops and every `save_every` events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from inbox import routing_state
from inbox.agents import Directory
from inbox.commands import Commands
from inbox.distribution import Distributor
from inbox.domain.routing import Router
from inbox.ingest import Ingestor
from infra import composition
from infra.store import EventStore
from projections.db import ReadModelDB
from projections.process_state import SET_ASIDE, ReadModelProcessStates
from tests.conftest import SettingsFactory
from tests.integration.test_distribution import (
    Center,
    FakeClock,
    center,  # noqa: F401  (the fixture)
)


def _plain(value: Any) -> Any:
    """A structure to compare two states by: objects as their class and fields, sets sorted
    (their order is a process's own: string hashes differ between processes)."""
    if isinstance(value, dict):
        return [(_plain(k), _plain(v)) for k, v in value.items()]
    if isinstance(value, set | frozenset):
        return sorted((_plain(item) for item in value), key=repr)
    if isinstance(value, list | tuple | deque):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return (type(value).__name__, _plain(fields))
    if hasattr(value, "__dict__") and not callable(value):
        return (type(value).__name__, _plain(value.__getstate__()))
    return value


# The process's own attributes, as this test knows them: all others must be taken up.
_OWN = {
    "decide",
    "store",
    "log",
    "directory",
    "clock",
    "batch_size",
    "caught_up",
    "voice_view",
    "stats",
    "states",
    "save_every",
    "_saved_at",
    "_initial",
    "_wake",
    "_loop",
}


def _state(distributor: Distributor) -> Any:
    return _plain({k: v for k, v in vars(distributor).items() if k not in _OWN})


def _stored_after(center: Center, position: int) -> int:  # noqa: F811
    """Events stored after `position` (PostgreSQL's ids may have gaps)."""
    return len(center.store.notifications(position, 1_000_000))


def _distributor(
    center: Center,  # noqa: F811
    states: ReadModelProcessStates,
    **router: Any,
) -> Distributor:
    return Distributor(
        center.store,
        center.directory,
        router=Router(**router) if router else None,
        clock=center.clock,
        states=states,
    )


def _a_busy_morning(
    center: Center,  # noqa: F811
    distributor: Distributor,
) -> None:
    """Offers, a lapse, an assignment, a resolve and a reopen, a handled call, SLA clocks."""
    center.queue(
        "sales",
        keywords=["price"],
        sla={"timezone": "UTC", "targets": {"0": {"first_response": "10m"}}},
        sla_actions={"warning": ["alert"], "breach": ["raise_priority"]},
    )
    center.agent("ann", capacity={"chat": 1, "email": 2, "voice": 1})
    center.agent("bob", capacity={"email": 1})
    center.contact("c1", channel="chat", visitor="v1")
    center.contact("m1", email="a@example.com", text="what is the price?")
    distributor.step()
    center.clock.advance(31)  # ann lets the chat offer lapse
    distributor.step()
    mail = center.contact("m2", email="b@example.com")
    distributor.step()
    assignee = center.conversation(mail.id).assignee
    assert assignee is not None
    center.commands.resolve(mail.id, actor=assignee)
    center.clock.advance(60)
    center.contact("m3", email="b@example.com", text="one more thing")  # reopens it
    call = {"channel": "voice", "email": "caller@example.com"}
    center.contact(
        "CA1:q", type="call.queued", payload={"call_sid": "CA1", "queue": "default"}, **call
    )
    distributor.step()
    center.contact(
        "CA1:a",
        type="call.answered",
        payload={"call_sid": "CA1", "queue": "default", "agent": "ann"},
        **call,
    )
    center.contact(
        "CA1:e",
        type="call.ended",
        payload={"call_sid": "CA1", "talk_seconds": 200, "hold_seconds": 10, "wrap_seconds": 20},
        **call,
    )
    center.clock.advance(600)
    distributor.step()
    center.contact("m5", email="c@example.com", text="price for ten?")  # an SLA clock runs
    distributor.step()


def test_a_restart_takes_up_the_saved_state_and_ends_where_one_that_never_stopped_is(
    center: Center,  # noqa: F811
    db: ReadModelDB,
) -> None:
    states = ReadModelProcessStates(db)
    running = _distributor(center, states)
    _a_busy_morning(center, running)
    assert running.save_state()
    saved_at = running.position
    saved = states.latest("routing")
    assert saved is not None
    # ids, queue names and times: nothing personal that an erasure would have to find
    for personal in (b"a@example.com", b"caller@example.com", b"what is the", b"one more"):
        assert personal not in saved[1]
    # more happens while it is down
    center.clock.advance(5)
    center.contact("c2", channel="chat", visitor="v2")
    center.contact("m4", email="a@example.com", text="still there?")

    restarted = _distributor(center, states)
    assert restarted.restore()
    assert restarted.catch_up() == _stored_after(center, saved_at)  # only what came after
    running.catch_up()  # the one that never stopped reads the same
    assert running._timers  # (an SLA clock was running when it was saved)
    assert _state(restarted) == _state(running)
    # and it decides from there: the new chat goes to the agent with chat capacity free
    before = center.store.max_notification_id()
    restarted.step()
    assert center.store.max_notification_id() > before

    # Without the saved state, the whole log is read (as before there were any).
    fresh = Distributor(center.store, center.directory, clock=center.clock)
    assert fresh.catch_up() == _stored_after(center, 0)


def test_a_saved_state_is_used_only_by_the_same_code_and_settings_of_a_store_that_has_it(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    states = ReadModelProcessStates(db)
    running = _distributor(center, states)
    _a_busy_morning(center, running)
    head = center.store.max_notification_id()
    assert running.save_state()

    # other router settings
    other = _distributor(center, states, sticky_wait=30.0)
    assert not other.restore()
    assert other.catch_up() == _stored_after(center, 0)

    # other code
    saved = states.latest("routing")
    assert saved is not None
    monkeypatch.setattr(routing_state, "code_fingerprint", lambda: "other code")
    assert not _distributor(center, states).restore()
    monkeypatch.undo()
    assert _distributor(center, states).restore()  # the same row, this code

    # a position the event store does not have (another store, a restored backup)
    states.save("routing", head + 10, saved[1])
    assert not _distributor(center, states).restore()
    states.save("routing", *saved)
    assert _distributor(center, states).restore()


def test_a_saved_state_is_not_taken_up_from_another_store_that_has_grown_past_it(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    other_store: EventStore,
) -> None:
    """The read models were kept, the event store was swapped for another (a backup of
    another site, a store started again): its record at the saved position is not the one
    the state was saved after."""
    states = ReadModelProcessStates(db)
    running = _distributor(center, states)
    _a_busy_morning(center, running)
    assert running.save_state()

    store, clock = other_store, FakeClock()
    other = Center(
        store,
        clock,
        Directory(store, admin_token="admin-token", clock=clock),
        Commands(store, clock=clock),
        Ingestor(store),
    )
    other.contact("x0", email="first@example.com")  # the same morning, one contact later
    _a_busy_morning(other, Distributor(store, other.directory, clock=clock))
    assert store.max_notification_id() > running.position

    swapped = Distributor(store, other.directory, clock=clock, states=states)
    assert not swapped.restore()
    assert swapped.catch_up() == len(store.notifications(0, 1_000_000))
    assert _distributor(center, states).restore()  # the store it was saved from


class _Remove:
    """What an attacker's pickle would do: call a function of their choice when read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.remove, (str(self.path),))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a pickle",
        pickle.dumps({"code": "x"}),
        pickle.dumps([1, 2, 3]),
        pickle.dumps({"code": None, "config": None, "state": None})[:-5],
    ],
)
def test_an_unreadable_saved_state_is_ignored(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    data: bytes,
) -> None:
    states = ReadModelProcessStates(db)
    center.contact("m1", email="a@example.com")
    states.save("routing", 1, data)
    distributor = _distributor(center, states)
    assert not distributor.restore()
    assert distributor.catch_up() == _stored_after(center, 0)


def test_a_saved_state_builds_nothing_but_this_projects_classes(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    tmp_path: Path,
) -> None:
    states = ReadModelProcessStates(db)
    center.contact("m1", email="a@example.com")
    victim = tmp_path / "victim"
    victim.write_text("still here")
    state = {"position": 1, "convs": _Remove(victim)}
    states.save(
        "routing", 1, pickle.dumps({"code": routing_state.code_fingerprint(), "state": state})
    )
    assert not _distributor(center, states).restore()
    assert victim.read_text() == "still here"


def test_the_process_saves_every_so_many_events_and_when_it_stops(
    center: Center,  # noqa: F811
    db: ReadModelDB,
) -> None:
    states = ReadModelProcessStates(db)
    center.agent("ann", capacity={"email": 1})
    center.contact("m1", email="a@example.com")

    async def run_until(done: Any, *, save_every: int) -> Distributor:
        distributor = Distributor(
            center.store,
            center.directory,
            clock=center.clock,
            states=states,
            save_every=save_every,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(distributor.run(stop, poll_interval=0.01))
        for _ in range(1000):
            if done(distributor):
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return distributor

    def saved() -> int:
        latest = states.latest("routing")
        return -1 if latest is None else latest[0]

    # every event: saved while it runs, before it is told to stop
    first = asyncio.run(run_until(lambda _: saved() > 0, save_every=1))
    assert saved() > 0
    assert first.position == center.store.max_notification_id()

    # a large interval: saved only when it stops
    center.contact("m2", email="b@example.com")
    before = saved()
    head = center.store.max_notification_id()
    second = asyncio.run(
        run_until(lambda d: d.caught_up and d.position >= head, save_every=1_000_000)
    )
    assert saved() > before
    assert saved() == second.position


def test_the_routing_process_takes_up_what_it_saved_when_it_stopped(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    database_url: str,
    settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`inbox route` as the CLI runs it (composition.run, routing only)."""
    center.agent("ann", capacity={"email": 1})
    mail = center.contact("m1", email="a@example.com")
    config = settings(database_url, bootstrap=None, INBOX_METRICS_PORT="")

    async def route_until(done: Any) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            composition.run(
                config,
                http=False,
                worker=False,
                projections=False,
                routing=True,
                say=lambda _: None,
                stop=stop,
            )
        )
        for _ in range(1000):
            if done() or task.done():
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 30)

    before = center.store.max_notification_id()
    asyncio.run(route_until(lambda: center.conversation(mail.id).assignee == "ann"))
    states = ReadModelProcessStates(db)
    saved = states.latest("routing")
    # saved when it stopped (far fewer events than SAVE_EVERY), with all it had read
    assert saved is not None
    assert saved[0] >= before

    caplog.set_level(logging.INFO, logger="inbox.distribution")
    second = center.contact("m2", email="b@example.com")
    center.commands.resolve(mail.id, actor="ann")
    asyncio.run(route_until(lambda: center.conversation(second.id).assignee == "ann"))
    assert f"took up the state saved at position {saved[0]}" in caplog.text


# -- resolved conversations set aside --------------------------------------------------------


def _set_aside(db: ReadModelDB, distributor: Distributor) -> dict[str, Any]:
    """The records the distributor set aside, read back as it would."""
    with db.read() as tx:
        tx.execute(f"SELECT key, record FROM {SET_ASIDE} WHERE name=?", (distributor.state_name,))
        rows = tx.fetchall()
    settings = distributor.router.settings
    return {key: routing_state.load(bytes(data), settings)["conversation"] for key, data in rows}


def _records(distributor: Distributor, set_aside: dict[str, Any] | None = None) -> Any:
    """Its conversations' records with those it set aside put back, in key order (the order
    they were read back in is the process's own)."""
    return _plain(dict(sorted({**(set_aside or {}), **distributor.convs}.items())))


def test_resolved_conversations_are_set_aside_and_read_back_exactly_when_the_log_needs_them(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The routing process, setting resolved conversations aside at every save, holds the
    very records of a mirror that keeps everything, and routes a conversation again when it
    comes back: by a new message, an agent's reopen. A queue mirror sets nothing aside (one
    runs in every `inbox serve`: mirrors under one name would overwrite each other's)."""
    caplog.set_level(logging.WARNING, logger="inbox.distribution")
    states = ReadModelProcessStates(db)
    router = _distributor(center, states)
    mirror = Distributor(
        center.store, center.directory, clock=center.clock, decide=False, states=states
    )
    keeping = Distributor(center.store, center.directory, clock=center.clock, decide=False)

    def round_and_compare() -> None:
        router.step()
        router.catch_up()  # its own decisions, read back
        assert router.save_state()
        keeping.catch_up()
        assert router.position == keeping.position
        assert _records(router, _set_aside(db, router)) == _records(keeping)
        resolved = {cid for cid, c in keeping.convs.items() if c.status == "resolved"}
        assert not resolved & set(router.convs)
        mirror.catch_up()
        mirror.save_state()
        assert _records(mirror) == _records(keeping)  # all of them, in memory
        assert _set_aside(db, mirror) == {}

    _a_busy_morning(center, router)
    center.agent("cy", capacity={"email": 9, "voice": 1})
    mails = [center.contact(f"r{n}", email=f"r{n}@example.com") for n in range(3)]
    round_and_compare()
    for mail in mails:
        assignee = center.conversation(mail.id).assignee
        assert assignee is not None
        center.commands.resolve(mail.id, actor=assignee)
    round_and_compare()
    assert not {str(m.id) for m in mails} & set(router.convs)  # set aside, out of memory
    assert set(_set_aside(db, router)) >= {str(m.id) for m in mails}

    # what comes without changing it (an auto-reply) reads it back, and the next save sets
    # it aside again
    auto_reply = {"text": "I am away", "auto_submitted": True}
    center.contact("r0:auto", email="r0@example.com", payload=auto_reply)
    center.contact("n1", email="new@example.com")  # and a new one, opened in the same read
    assert center.conversation(mails[0].id).status == "resolved"
    router.catch_up()
    assert router.convs[str(mails[0].id)].status == "resolved"
    round_and_compare()
    assert str(mails[0].id) not in router.convs

    # the customer writes again: reopened, and routed again by the deciding process
    center.clock.advance(60)
    center.contact("r1:again", email="r1@example.com", text="it broke again")
    router.step()
    assert center.conversation(mails[1].id).status == "open"
    assert center.conversation(mails[1].id).assignee is not None
    round_and_compare()

    # an agent reopens one: its record comes back with the agent it had
    center.commands.reopen(mails[2].id, actor="ann")
    round_and_compare()
    assert router.convs[str(mails[2].id)].status == "open"

    # a restart takes up the state without them and reads them back as well
    center.clock.advance(60)
    center.contact("r0:again", email="r0@example.com", text="and now?")
    restarted = _distributor(center, states)
    assert restarted.restore()
    restarted.catch_up()
    keeping.catch_up()
    assert _records(restarted, _set_aside(db, restarted)) == _records(keeping)
    assert restarted.convs[str(mails[0].id)].status == "open"
    # and a restarted mirror has every record, resolved ones too, from its state alone
    mirror_again = Distributor(
        center.store, center.directory, clock=center.clock, decide=False, states=states
    )
    center.commands.resolve(mails[1].id, actor="cy")
    mirror.catch_up()
    keeping.catch_up()
    assert any(c.status == "resolved" for c in keeping.convs.values())
    assert mirror.save_state()
    assert mirror_again.restore()
    assert _records(mirror_again) == _records(keeping)
    assert "reading the whole log again" not in caplog.text  # each record was there


def test_a_conversation_set_aside_that_cannot_be_read_back_makes_it_read_the_whole_log(
    center: Center,  # noqa: F811
    db: ReadModelDB,
    caplog: pytest.LogCaptureFixture,
) -> None:
    states = ReadModelProcessStates(db)
    router = _distributor(center, states)
    center.agent("ann", capacity={"email": 3})
    mail = center.contact("m1", email="a@example.com")
    other = center.contact("m2", email="b@example.com")
    back = center.contact("m3", email="c@example.com")
    router.step()
    for conversation in (mail, other, back):
        center.commands.resolve(conversation.id, actor="ann")
    router.step()
    assert router.save_state()
    assert str(mail.id) not in router.convs

    with db.transaction() as tx:  # the record is lost (deleted by hand, say)
        tx.execute(f"DELETE FROM {SET_ASIDE} WHERE key=?", (str(mail.id),))
    center.contact("m4", email="c@example.com", text="me again")
    center.contact("m5", email="a@example.com", text="hello again")
    caplog.set_level(logging.WARNING, logger="inbox.distribution")
    assert router.catch_up() > 0
    assert f"conversation {mail.id} is neither kept nor set aside" in caplog.text
    fresh = Distributor(center.store, center.directory, clock=center.clock)
    fresh.catch_up()
    assert _state(router) == _state(fresh)  # all of it, read again from the start
    router.step()
    assert center.conversation(mail.id).assignee == "ann"
    assert center.conversation(back.id).assignee == "ann"

    # its next save starts the records set aside afresh: the one resolved now, only (not
    # the reopened one's, set aside before)
    assert router.save_state()
    assert set(_set_aside(db, router)) == {str(other.id)}

    # a record set aside after the state's position is not taken either (nor anything
    # that is not a record of a conversation)
    for change, reason in [
        ("position = position + 1000", f"set aside after position {router.position}"),
        ("record = ?", "is not a conversation's record"),
    ]:
        with db.transaction() as tx:
            tx.execute(
                f"UPDATE {SET_ASIDE} SET {change} WHERE key=?",
                (routing_state.dump(router.router.settings, {"conversation": 1}), str(other.id))
                if "?" in change
                else (str(other.id),),
            )
        center.contact(f"again:{change}", email="b@example.com", text="me again")
        caplog.clear()
        router.catch_up()
        assert reason in caplog.text
        fresh.catch_up()
        assert _state(router) == _state(fresh)
        center.commands.resolve(other.id, actor="ann")
        router.step()
        assert router.save_state()
        assert str(other.id) not in router.convs
