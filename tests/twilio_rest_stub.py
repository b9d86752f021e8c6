"""A stand-in for Twilio's Calls API on a loopback port, for the tests of the callback dialer
and the call connector: the paths twilio's REST client calls, HTTP basic auth checked against
the account sid and token, every request recorded, and call outcomes scripted per number.

    async with running_stub(ACCOUNT, TOKEN, clock=clock) as stub:
        stub.script("+14155550123", Outcome("no-answer"), Outcome("completed"))
        calls = TwilioRestCalls(ACCOUNT, TOKEN, stub.url)

A created call answers its fetches with the statuses of its outcome's `progress` first, then
with the outcome's final status (and `answered_by`). Numbers with no script left complete,
answered by a human.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from infra.broker import free_port
from tests.support import serving

_API = "/2010-04-01/Accounts/{account}"
# The account the tests' stand-in accepts (the `stub` and `calls` fixtures use it).
ACCOUNT, TOKEN = "AC" + "1" * 32, "secret-token"


class FakeClock:
    """The time for the code under test and the stand-in alike, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass(frozen=True)
class Outcome:
    """How a placed call turns out: `status` once over, after the fetches of `progress`."""

    status: str = "completed"
    answered_by: str | None = "human"
    duration: int = 60
    progress: tuple[str, ...] = ()


@dataclass
class StubCall:
    sid: str
    to: str
    from_: str
    twiml: str
    created_at: datetime
    outcome: Outcome
    status: str = "queued"
    answered_by: str | None = None
    duration: int | None = None
    machine_detection: str | None = None
    ended_at: datetime | None = None
    placed: bool = False  # through POST Calls.json (not `add_call`)
    fetches: int = 0
    updates: list[str] = field(default_factory=list)

    def advance(self, now: datetime) -> None:
        """One fetch's worth of progress (`now`: the stub's clock, the end time of a call
        that ends with this fetch)."""
        self.fetches += 1
        if self.status in ("completed", "busy", "no-answer", "failed", "canceled"):
            return
        if self.fetches <= len(self.outcome.progress):
            self.status = self.outcome.progress[self.fetches - 1]
            return
        self.status = self.outcome.status
        self.ended_at = now
        if self.status == "completed":
            self.answered_by = self.outcome.answered_by
            self.duration = self.outcome.duration
        else:
            self.duration = 0

    def json(self, account: str) -> dict[str, Any]:
        created = _rfc2822(self.created_at)
        return {
            "sid": self.sid,
            "account_sid": account,
            "to": self.to,
            "from": self.from_,
            "status": self.status,
            "answered_by": self.answered_by,
            "duration": None if self.duration is None else str(self.duration),
            "date_created": created,
            "start_time": created,
            "end_time": None if self.ended_at is None else _rfc2822(self.ended_at),
            "uri": f"/2010-04-01/Accounts/{account}/Calls/{self.sid}.json",
        }


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]


class TwilioRestStub:
    def __init__(self, account_sid: str, auth_token: str, *, clock: Callable[[], datetime]) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.clock = clock
        self.url = ""
        self.received: list[Received] = []
        self.calls: dict[str, StubCall] = {}
        self.refused_auth = 0
        self._scripts: dict[str, list[Outcome]] = {}
        self._create_errors: list[tuple[int, dict[str, Any]]] = []

    # -- what a test tells it ----------------------------------------------------------------

    def script(self, number: str, *outcomes: Outcome) -> None:
        """The outcomes of the next calls placed to `number`, in order."""
        self._scripts.setdefault(number, []).extend(outcomes)

    def fail_next_create(self, status: int, code: int, message: str) -> None:
        self._create_errors.append((status, {"code": code, "message": message, "status": status}))

    def add_call(
        self,
        to: str,
        from_: str,
        *,
        status: str = "queued",
        outcome: Outcome | None = None,
        created_at: datetime | None = None,
    ) -> StubCall:
        """A call that exists at Twilio without having been placed through this stub's API
        (placed before a crash, or a caller's inbound call)."""
        call = StubCall(
            sid=f"CA{len(self.calls) + 1:032x}",
            to=to,
            from_=from_,
            twiml="",
            created_at=created_at or self.clock(),
            outcome=outcome or Outcome(),
            status=status,
        )
        self.calls[call.sid] = call
        return call

    # -- what a test reads -------------------------------------------------------------------

    def created(self, to: str | None = None) -> list[StubCall]:
        """Calls placed through POST Calls.json, in order (to one number, or to any)."""
        return [c for c in self.calls.values() if c.placed and (to is None or c.to == to)]

    def requests(self, method: str, suffix: str = "") -> list[Received]:
        return [r for r in self.received if r.method == method and r.path.endswith(suffix)]

    # -- the API ---------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route(f"{_API}/Calls.json", self._calls, methods=["GET", "POST"]),
            Route(f"{_API}/Calls/{{sid}}.json", self._call, methods=["GET", "POST"]),
        ]

    async def _received(self, request: Request) -> Received | Response:
        form = await request.form() if request.method == "POST" else None
        received = Received(
            request.method,
            request.url.path,
            dict(request.query_params),
            {k: v for k, v in form.multi_items() if isinstance(v, str)} if form else {},
        )
        self.received.append(received)
        if not self._authorised(request):
            self.refused_auth += 1
            return _error(401, 20003, "Authenticate")
        return received

    def _authorised(self, request: Request) -> bool:
        if request.path_params["account"] != self.account_sid:
            return False
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (user, password) == (self.account_sid, self.auth_token)

    async def _calls(self, request: Request) -> Response:
        received = await self._received(request)
        if isinstance(received, Response):
            return received
        if request.method == "GET":
            return self._list(received.query)
        if self._create_errors:
            status, body = self._create_errors.pop(0)
            return JSONResponse(body, status_code=status)
        form = received.form
        if not form.get("To") or not form.get("From") or not form.get("Twiml"):
            return _error(400, 21201, "To, From and Twiml are required")
        script = self._scripts.get(form["To"])
        call = self.add_call(
            form["To"], form["From"], outcome=script.pop(0) if script else Outcome()
        )
        call.twiml, call.placed = form["Twiml"], True
        call.machine_detection = form.get("MachineDetection")
        return JSONResponse(call.json(self.account_sid), status_code=201)

    def _list(self, query: dict[str, str]) -> Response:
        calls = [c for c in self.calls.values() if not query.get("To") or c.to == query["To"]]
        after = query.get("StartTime>")
        if after:
            since = datetime.fromisoformat(after.replace("Z", "+00:00"))
            calls = [c for c in calls if c.created_at >= since]
        calls.sort(key=lambda c: c.created_at, reverse=True)  # Twilio: newest first
        path = f"/2010-04-01/Accounts/{self.account_sid}/Calls.json"
        return JSONResponse(
            {
                "calls": [c.json(self.account_sid) for c in calls],
                "first_page_uri": path,
                "next_page_uri": None,
                "previous_page_uri": None,
                "page": 0,
                "page_size": 100,
                "start": 0,
                "end": max(len(calls) - 1, 0),
                "uri": path,
            }
        )

    async def _call(self, request: Request) -> Response:
        received = await self._received(request)
        if isinstance(received, Response):
            return received
        call = self.calls.get(request.path_params["sid"])
        if call is None:
            return _error(404, 20404, "The requested resource was not found")
        if request.method == "GET":
            call.advance(self.clock())
        elif received.form.get("Twiml"):
            call.updates.append(received.form["Twiml"])
        return JSONResponse(call.json(self.account_sid))


def _rfc2822(at: datetime) -> str:
    return format_datetime(at.astimezone(UTC), usegmt=True)


def _error(status: int, code: int, message: str) -> Response:
    return JSONResponse(
        {"code": code, "message": message, "more_info": "", "status": status}, status_code=status
    )


@contextlib.asynccontextmanager
async def running_stub(
    account_sid: str, auth_token: str, *, clock: Callable[[], datetime]
) -> AsyncIterator[TwilioRestStub]:
    stub = TwilioRestStub(account_sid, auth_token, clock=clock)
    async with serving(stub.routes(), free_port()) as url:
        stub.url = url
        yield stub
