"""Benchmarks: each prints its figures beside the raw limit measured in the same run."""

from __future__ import annotations

import tempfile

from infra.settings import Settings, load_settings


def fresh_settings(name: str, database_url: str | None) -> Settings:
    """Settings with a new data directory of the benchmark's own, and the database at
    `database_url` when given (SQLite in that directory otherwise)."""
    env = {"INBOX_DATA_DIR": tempfile.mkdtemp(prefix=f"bench-{name}-")}
    if database_url:
        env["INBOX_DATABASE_URL"] = database_url
    return load_settings(env)
