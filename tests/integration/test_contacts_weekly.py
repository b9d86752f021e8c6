"""The example report of docs/new-report.md, built from the whole history by a rebuild and
kept up to date live: both give the same rows (SQLite and PostgreSQL)."""

from __future__ import annotations

from projections.contacts_weekly import ContactsWeekly, contacts_per_week, iso_week
from projections.replay import rebuild
from projections.runner import ProjectionRunner
from tests.integration.test_projections import (
    World,
    contact,
    world,  # noqa: F401  (the fixture)
)


def test_iso_weeks() -> None:
    assert iso_week("2026-11-27T10:00:00.000000Z") == "2026-W48"
    assert iso_week("2027-01-01T00:00:00.000000Z") == "2026-W53"  # ISO years end on weeks


def test_contacts_per_customer_per_week_from_the_whole_history(world: World) -> None:  # noqa: F811
    week = 60 * 24 * 7
    world.ingest(
        contact("a1", 0, email="a@example.com"),  # Monday 2026-03-02: week 10
        contact("a2", 60, email="a@example.com"),
        contact(
            "a3",
            120,
            channel="voice",
            type="call.started",
            email="a@example.com",
            payload={"call_sid": "CA1", "to": "+15005550006"},
        ),
        contact(
            "a4",
            121,
            channel="voice",
            type="ivr.selected",  # not a new contact
            email="a@example.com",
            payload={"call_sid": "CA1", "node": "main", "choice": "1", "path": ["main"]},
        ),
        contact("b1", 30, email="b@example.com"),
        contact("a5", week + 5, email="a@example.com"),  # week 11
    )
    # the report is new: it is built from everything recorded so far
    rebuild(world.store, world.db, "contacts_weekly", from_start=True)
    a = world.customer_of("email:a@example.com")
    b = world.customer_of("email:b@example.com")
    assert contacts_per_week(world.db, week="2026-W10") == [
        {"customer": str(a.id), "week": "2026-W10", "contacts": 3},
        {"customer": str(b.id), "week": "2026-W10", "contacts": 1},
    ]
    assert contacts_per_week(world.db, customer=str(a.id), week="2026-W11") == [
        {"customer": str(a.id), "week": "2026-W11", "contacts": 1}
    ]

    # and it follows the log from there, the same as a fresh rebuild
    world.ingest(contact("b2", week + 10, email="b@example.com"))
    ProjectionRunner(world.store, world.db, [ContactsWeekly()]).run_until_caught_up()
    live = contacts_per_week(world.db)
    rebuild(world.store, world.db, "contacts_weekly", from_start=True, batch_size=2)
    assert contacts_per_week(world.db) == live
    assert {r["week"]: r["contacts"] for r in live if r["customer"] == str(b.id)} == {
        "2026-W10": 1,
        "2026-W11": 1,
    }
