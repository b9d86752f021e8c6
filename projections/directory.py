"""The directory: agents (profile and presence, never the token hash) and queues (their
definitions), for the admin and supervisor API and for scoping an agent's inbox.

Tables (generation N): `directory_agents_gN`, `directory_queues_gN`; upserts only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from projections.base import Event, table
from projections.db import ReadModelDB, Tx
from projections.tracking import active_table

NAME = "directory"
AGENTS = "directory_agents"
QUEUES = "directory_queues"


class DirectoryView:
    name = NAME
    handles = frozenset(
        {
            "Agent.Registered",
            "Agent.ProfileChanged",
            "Agent.PresenceChanged",
            "Queue.Defined",
            "Queue.Changed",
        }
    )

    def tables(self, generation: int) -> list[str]:
        return [table(AGENTS, generation), table(QUEUES, generation)]

    def create_tables(self, tx: Tx, generation: int) -> None:
        agents, queues = self.tables(generation)
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {agents} (aggregate_id TEXT PRIMARY KEY, "
            "agent_id TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL, "
            "skills TEXT NOT NULL, languages TEXT NOT NULL, capacity TEXT NOT NULL, "
            "presence TEXT NOT NULL, presence_since TEXT NOT NULL, updated_at TEXT NOT NULL)"
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {queues} (aggregate_id TEXT PRIMARY KEY, "
            "name TEXT NOT NULL, spec TEXT NOT NULL, updated_at TEXT NOT NULL)"
        )

    def create_indexes(self, tx: Tx, generation: int) -> None:
        """Few rows: the primary keys do."""

    def committed(self, generation: int, position: int) -> None:
        """Nothing kept in memory."""

    def forget(self) -> None:
        """Nothing kept in memory."""

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        agents, queues = self.tables(generation)
        for e in events:
            s = e.state
            if e.name in ("Agent.Registered", "Agent.ProfileChanged"):
                profile = (
                    s["name"],
                    s["role"],
                    orjson.dumps(s["skills"]).decode(),
                    orjson.dumps(s["languages"]).decode(),
                    orjson.dumps(s["capacity"]).decode(),
                )
                if e.name == "Agent.Registered":
                    tx.execute(
                        f"INSERT INTO {agents} VALUES (?,?,?,?,?,?,?,?,?,?) "
                        "ON CONFLICT (aggregate_id) DO NOTHING",
                        (e.originator_id, s["agent_id"], *profile, "offline", s["at"], s["at"]),
                    )
                else:
                    tx.execute(
                        f"UPDATE {agents} SET name=?, role=?, skills=?, languages=?, "
                        "capacity=?, updated_at=? WHERE aggregate_id=?",
                        (*profile, s["at"], e.originator_id),
                    )
            elif e.name == "Agent.PresenceChanged":
                tx.execute(
                    f"UPDATE {agents} SET presence=?, presence_since=?, updated_at=? "
                    "WHERE aggregate_id=?",
                    (s["status"], s["at"], s["at"], e.originator_id),
                )
            else:
                name = s.get("name")
                spec = orjson.dumps(s["spec"]).decode()
                if e.name == "Queue.Defined":
                    tx.execute(
                        f"INSERT INTO {queues} VALUES (?,?,?,?) "
                        "ON CONFLICT (aggregate_id) DO NOTHING",
                        (e.originator_id, name, spec, s["at"]),
                    )
                else:
                    tx.execute(
                        f"UPDATE {queues} SET spec=?, updated_at=? WHERE aggregate_id=?",
                        (spec, s["at"], e.originator_id),
                    )


def list_agents(db: ReadModelDB) -> list[dict[str, Any]]:
    with db.read() as tx:
        agents = active_table(tx, NAME, AGENTS)
        if agents is None:
            return []
        tx.execute(
            "SELECT agent_id, name, role, skills, languages, capacity, presence, presence_since "
            f"FROM {agents} ORDER BY agent_id"
        )
        return [
            {
                "id": agent_id,
                "name": name,
                "role": role,
                "skills": orjson.loads(skills),
                "languages": orjson.loads(languages),
                "capacity": orjson.loads(capacity),
                "presence": presence,
                "presence_since": since,
            }
            for agent_id, name, role, skills, languages, capacity, presence, since in tx.fetchall()
        ]


def list_queues(db: ReadModelDB) -> list[dict[str, Any]]:
    with db.read() as tx:
        queues = active_table(tx, NAME, QUEUES)
        if queues is None:
            return []
        tx.execute(f"SELECT name, spec, updated_at FROM {queues} ORDER BY name")
        return [
            {"name": name, **orjson.loads(spec), "updated_at": updated_at}
            for name, spec, updated_at in tx.fetchall()
        ]
