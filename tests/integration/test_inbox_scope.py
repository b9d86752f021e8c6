"""An agent's inbox list (`list_conversations(scope=...)`): what is assigned or offered to
them, and the unassigned conversations of the queues they may take, newest update first,
each once across pages. The rows are written straight into the view's table (with the real
indexes), so the query is checked against the rule for any mix of states, on SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from projections.db import ReadModelDB, open_read_models
from projections.inbox_view import _CONV_COLUMNS, CONVERSATIONS, NAME, InboxView, list_conversations
from projections.tracking import active_table, ensure_active, ensure_state_table
from tests.conftest import SettingsFactory

ME, OTHER = "me", "other"
QUEUES = ("billing", "sales", "vip")


@dataclass(frozen=True)
class Row:
    id: str
    status: str
    assignee: str | None
    offered_to: str | None
    queue: str | None
    updated_at: str


def in_scope(row: Row, agent: str, forbidden: frozenset[str]) -> bool:
    """The rule, written independently of the SQL."""
    if row.assignee == agent or row.offered_to == agent:
        return True
    return row.assignee is None and row.queue is not None and row.queue not in forbidden


@pytest.fixture
def db(database_url: str, settings: SettingsFactory) -> Iterator[ReadModelDB]:
    read_models = open_read_models(settings(database_url, bootstrap=None))
    ensure_state_table(read_models)
    ensure_active(read_models, InboxView())  # the tables and their indexes
    try:
        yield read_models
    finally:
        read_models.close()


def put(db: ReadModelDB, rows: list[Row]) -> None:
    values: dict[str, Any] = {
        "customer_id": "cust",
        "owner_id": "cust",
        "channels": '["email"]',
        "priority": 0,
        "escalated": 0,
        "opened_at": "2026-11-01T00:00:00.000000Z",
        "events": 1,
        "position": 1,
    }
    with db.transaction() as tx:
        table = active_table(tx, NAME, CONVERSATIONS)
        assert table is not None
        tx.execute(f"DELETE FROM {table}")
        marks = ",".join("?" * len(_CONV_COLUMNS))
        tx.executemany(
            f"INSERT INTO {table} ({', '.join(_CONV_COLUMNS)}) VALUES ({marks})",
            [
                tuple({**values, **row.__dict__}.get(column) for column in _CONV_COLUMNS)
                for row in rows
            ],
        )


def every_page(db: ReadModelDB, limit: int, **filters: Any) -> list[str]:
    """The ids of all pages, following `next` to the end."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page = list_conversations(db, limit=limit, cursor=cursor, **filters)
        found.extend(item["id"] for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            return found
        assert len(page["items"]) == limit


def newest_first(rows: list[Row]) -> list[str]:
    return [r.id for r in sorted(rows, key=lambda r: (r.updated_at, r.id), reverse=True)]


def row(
    n: int, status: str, assignee: str | None, offered_to: str | None, queue: str | None
) -> Row:
    return Row(f"c{n:03d}", status, assignee, offered_to, queue, f"2026-11-02T10:{n:02d}:00Z")


def test_an_agent_sees_theirs_and_their_queues_unassigned_ones_newest_first(
    db: ReadModelDB,
) -> None:
    # given conversations in every relation to the agent, the other agent's the newest
    rows = [
        row(1, "open", ME, None, "sales"),  # assigned to me
        row(2, "open", None, ME, "vip"),  # offered to me, in a queue I may not take
        row(3, "open", None, None, "sales"),  # unassigned in my queue
        row(4, "open", None, None, "vip"),  # unassigned in a queue I may not take
        row(5, "open", None, None, None),  # no queue yet: the supervisors'
        row(6, "pending", None, None, "billing"),  # pending counts as open work
        row(7, "resolved", ME, None, "sales"),  # resolved: only with status=
        row(8, "open", OTHER, None, "sales"),  # someone else's
        row(9, "open", OTHER, ME, "sales"),  # offered to me, but assigned to them
        *(row(10 + n, "open", OTHER, None, "sales") for n in range(40)),
    ]
    put(db, rows)
    scope = (ME, ["vip"])

    # when the agent lists their inbox, then
    assert every_page(db, 2, scope=scope) == ["c009", "c006", "c003", "c002", "c001"]
    assert every_page(db, 50, scope=scope, status="all")[-1] == "c001"
    assert "c007" in every_page(db, 50, scope=scope, status="all")
    assert every_page(db, 50, scope=scope, status="resolved") == ["c007"]
    assert every_page(db, 50, scope=scope, queue="sales") == ["c009", "c003", "c001"]
    assert every_page(db, 50, scope=scope, assignee=ME) == ["c001"]
    assert every_page(db, 50, scope=(ME, [])) == ["c009", "c006", "c004", "c003", "c002", "c001"]
    assert every_page(db, 50, scope=("nobody", list(QUEUES))) == []


STATUSES = st.sampled_from(["open", "pending", "resolved"])
PEOPLE = st.sampled_from([ME, OTHER, None])
ROWS = st.lists(
    st.builds(
        lambda status, assignee, offered, queue, minute: (status, assignee, offered, queue, minute),
        STATUSES,
        PEOPLE,
        PEOPLE,
        st.sampled_from([*QUEUES, None]),
        st.integers(0, 5),  # few distinct times: ties are broken by id
    ),
    max_size=30,
)


@hypothesis_settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=ROWS,
    forbidden=st.frozensets(st.sampled_from(QUEUES)),
    status=st.sampled_from([None, "open", "all", "open,resolved"]),
    queue=st.sampled_from([None, "sales"]),
    limit=st.integers(1, 4),
)
def test_every_page_of_a_scoped_list_follows_the_rule(
    db: ReadModelDB,
    specs: list[tuple[str, str | None, str | None, str | None, int]],
    forbidden: frozenset[str],
    status: str | None,
    queue: str | None,
    limit: int,
) -> None:
    # given any mix of conversations
    rows = [
        Row(f"c{n:03d}", s, assignee, offered, q, f"2026-11-02T10:0{minute}:00Z")
        for n, (s, assignee, offered, q, minute) in enumerate(specs)
    ]
    put(db, rows)
    statuses = {"open", "pending"} if status is None else {"open", "pending", "resolved"}
    if status is not None and status != "all":
        statuses = set(status.split(","))

    # when the agent pages through their list
    found = every_page(db, limit, scope=(ME, sorted(forbidden)), status=status, queue=queue)

    # then it is exactly the rows the rule lets them see, newest first, each once
    expected = [
        r
        for r in rows
        if r.status in statuses
        and (queue is None or r.queue == queue)
        and in_scope(r, ME, forbidden)
    ]
    assert found == newest_first(expected)
