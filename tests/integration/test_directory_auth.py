"""Agents' tokens against the real event store (SQLite and PostgreSQL): a valid token's answer
is kept for AUTH_TTL; what this Directory changes takes effect at once, what another process
changes once the answer has aged out. Agent ids and queue names are whole and plain."""

from __future__ import annotations

import pytest

from inbox.agents import AUTH_TTL, Directory, InvalidSpec, agent_profile, is_queue_name, queue_spec
from infra.store import EventStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_change_elsewhere_shows_once_the_kept_answer_ages_out(store: EventStore) -> None:
    clock = Clock()
    api = Directory(store, admin_token="admin", monotonic=clock)
    elsewhere = Directory(store, admin_token="admin")  # as the CLI, another process
    token = api.register("ann", agent_profile({"name": "Ann", "role": "agent"}), actor="admin")
    assert api.authenticate(token) is not None

    elsewhere.change_profile(
        "ann", agent_profile({"name": "Ann", "role": "supervisor"}), actor="admin"
    )
    kept = api.authenticate(token)
    assert kept is not None
    assert kept.role == "agent"

    clock.now += AUTH_TTL + 0.1
    fresh = api.authenticate(token)
    assert fresh is not None
    assert fresh.role == "supervisor"


def test_what_this_directory_changes_takes_effect_at_once(store: EventStore) -> None:
    api = Directory(store, admin_token="admin", monotonic=Clock())  # the clock never moves
    old = api.register("bob", agent_profile({"name": "Bob"}), actor="admin")
    assert api.authenticate(old) is not None

    new = api.replace_token("bob", actor="admin")
    assert api.authenticate(old) is None
    assert api.authenticate(new) is not None

    api.change_profile("bob", agent_profile({"name": "Bob", "skills": ["billing"]}), actor="admin")
    changed = api.authenticate(new)
    assert changed is not None
    assert changed.skills == frozenset({"billing"})


def test_a_wrong_token_is_refused_every_time(store: EventStore) -> None:
    api = Directory(store, admin_token="admin", monotonic=Clock())
    token = api.register("cy", agent_profile({"name": "Cy"}), actor="admin")
    for _ in range(2):
        assert api.authenticate(token + "x") is None
        assert api.authenticate("cy.") is None
        assert api.authenticate("nobody.secret") is None
    assert api.authenticate(token) is not None


@pytest.mark.parametrize("agent_id", ["bob\n", "bob\nx", "", "-bob", "a" * 65])
def test_an_agent_id_is_whole_and_plain(store: EventStore, agent_id: str) -> None:
    """(A pattern ending in `$` also took "bob\\n": an agent whose token could never be sent.)"""
    directory = Directory(store, admin_token="admin-token")
    with pytest.raises(InvalidSpec):
        directory.register(agent_id, agent_profile({"name": "Bob", "role": "agent"}), actor="a")
    assert directory.agent(agent_id.strip() or "x") is None


@pytest.mark.parametrize("name", ["q1\n", "Q1", "q 1", "", "-q"])
def test_a_queue_name_is_whole_and_plain(name: str) -> None:
    assert not is_queue_name(name)
    with pytest.raises(InvalidSpec):
        queue_spec(name, {})
