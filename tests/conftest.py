"""Shared fixtures: one embedded Kafka broker and one throw-away PostgreSQL per test session.

Fixtures
- `kafka_broker` (session): the running `EmbeddedBroker`; `kafka_bootstrap` (session): its
  "127.0.0.1:PORT".
- `fresh_topic` (function): `fresh_topic(base="topic") -> str`, a topic name unique to the
  call, so tests sharing the broker never see each other's records.
- `postgresql_proc` (session): a `PostgresServer` (host, port, user, version); skipped where no
  PostgreSQL binaries exist, failed instead when INBOX_REQUIRE_POSTGRES=1.
- `postgres_url` (function): a fresh empty database on it, dropped afterwards.
- `database_url` (function, params "sqlite" and "postgres"): a SQLite URL under tmp_path or
  `postgres_url`; the postgres case carries the `postgres` mark.
- `settings` (function): `settings(database_url=None, *, data_dir=None, bootstrap=..., **env)
  -> Settings` via `load_settings`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import psycopg
import pytest
from psycopg import sql

from infra.broker import EmbeddedBroker
from infra.settings import Settings, load_settings

# --------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("kafka") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: EmbeddedBroker) -> str:
    return kafka_broker.bootstrap


def unique_topic(base: str = "topic") -> str:
    """A topic name no other test uses."""
    return f"{base}-{uuid.uuid4().hex[:12]}"


class TopicFactory(Protocol):
    def __call__(self, base: str = "topic") -> str: ...


@pytest.fixture
def fresh_topic() -> TopicFactory:
    return unique_topic


# --------------------------------------------------------------------------- PostgreSQL

REQUIRE_POSTGRES_ENV = "INBOX_REQUIRE_POSTGRES"


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/pg_ctl
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def find_pg_bindir() -> Path | None:
    """The bin directory of the newest Debian PostgreSQL, else of pg_ctl on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=_version_key)
    for pg_ctl in reversed(candidates):
        if os.access(pg_ctl, os.X_OK) and (pg_ctl.parent / "initdb").exists():
            return pg_ctl.parent
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        bindir = Path(on_path).resolve().parent
        if (bindir / "initdb").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL cluster in a temp dir: trust auth, loopback TCP only.

    PostgreSQL refuses to run as root; as root every server command runs as the `postgres`
    system user through `runuser`, in a directory that user owns.
    """

    bindir: Path
    run_as: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    user: str = "postgres"
    dbname: str = "postgres"
    version: str = ""
    basedir: Path | None = None
    startup_seconds: float = 0.0

    @property
    def workdir(self) -> Path:
        if self.basedir is None:
            raise RuntimeError("the PostgreSQL server has not been started")
        return self.basedir

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def logfile(self) -> Path:
        return self.workdir / "postgresql.log"

    def url(self, dbname: str | None = None) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname or self.dbname}"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}"
            )

    def start(self) -> None:
        basedir = self.basedir = Path(tempfile.mkdtemp(prefix="inbox-pg-"))
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            os.chown(basedir, entry.pw_uid, entry.pw_gid)
        self.port = _free_port()
        self._check(
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            "initdb",
        )
        options = " ".join(
            [
                f"-p {self.port}",
                f"-c listen_addresses={self.host}",
                f"-c unix_socket_directories={basedir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._check(
            self._run(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            ),
            "pg_ctl start",
        )
        with psycopg.connect(self.url(), autocommit=True) as conn:
            self.version = str(conn.info.server_version)

    def stop(self) -> None:
        if self.basedir is None:
            return
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.basedir, ignore_errors=True)
        self.basedir = None

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _postgres_unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_POSTGRES_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgresql_proc() -> Iterator[PostgresServer]:
    bindir = find_pg_bindir()
    if bindir is None:
        _postgres_unavailable(
            "no PostgreSQL binaries (looked for /usr/lib/postgresql/*/bin/pg_ctl and pg_ctl "
            "on PATH)"
        )
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _postgres_unavailable("running as root and no `postgres` user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            _postgres_unavailable("running as root and no `runuser` to run PostgreSQL as postgres")
        run_as = "postgres"
    server = PostgresServer(bindir=bindir, run_as=run_as)
    started = time.monotonic()
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        server.stop()
        _postgres_unavailable(f"could not start PostgreSQL from {bindir}: {exc}")
    server.startup_seconds = time.monotonic() - started
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgresql_proc: PostgresServer) -> Iterator[str]:
    name = postgresql_proc.create_database()
    try:
        yield postgresql_proc.url(name)
    finally:
        postgresql_proc.drop_database(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inbox.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# --------------------------------------------------------------------------- Settings


class SettingsFactory(Protocol):
    def __call__(
        self,
        database_url: str | None = None,
        *,
        data_dir: Path | None = None,
        bootstrap: str | None = ...,
        **env: str,
    ) -> Settings: ...


_USE_TEST_BROKER = "<kafka_bootstrap>"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> SettingsFactory:
    """Build Settings from an INBOX_* environment of the test's own.

    `bootstrap` defaults to the session broker (started on first use); pass None for
    "INBOX_KAFKA_BOOTSTRAP unset". Extra keyword arguments are environment variables
    (e.g. INBOX_HTTP_PORT="0").
    """

    def build(
        database_url: str | None = None,
        *,
        data_dir: Path | None = None,
        bootstrap: str | None = _USE_TEST_BROKER,
        **env: str,
    ) -> Settings:
        directory = data_dir or tmp_path / "var"
        directory.mkdir(parents=True, exist_ok=True)
        values = {"INBOX_DATA_DIR": str(directory)}
        if database_url is not None:
            values["INBOX_DATABASE_URL"] = database_url
        if bootstrap == _USE_TEST_BROKER:
            bootstrap = str(request.getfixturevalue("kafka_bootstrap"))
        if bootstrap is not None:
            values["INBOX_KAFKA_BOOTSTRAP"] = bootstrap
            # The embedded broker rejects InitProducerId (DESIGN.md).
            values.setdefault("INBOX_KAFKA_IDEMPOTENCE", "0")
        values.update(env)
        return load_settings(values)

    return build
