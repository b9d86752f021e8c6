"""The HTTP API (Starlette): agent API, health and Prometheus metrics.

Routes read projections or the event store from a worker thread (both are synchronous);
errors are JSON `{"error": {"code", "message"}}` mapped in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from inbox import audit, telemetry
from inbox.access import Principal, can_work_on
from inbox.agents import (
    AlreadyExists,
    Directory,
    InvalidSpec,
    agent_profile,
    queue_spec,
)
from inbox.commands import Commands, NotFound
from inbox.contact import CHANNELS, holds_nul
from inbox.domain.conversation import Conversation
from inbox.domain.errors import ConversationStateError, CustomerMergeError, DomainError
from inbox.domain.time import parse_instant
from inbox.identity import InvalidIdentity, parse_key
from infra.store import EventStore
from projections import directory, inbox_view, timeline, tracking
from projections.db import ReadModelDB
from projections.escalations import escalation_queues
from projections.metrics_query import metrics

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class ApiContext:
    store: EventStore
    read_models: ReadModelDB
    admin_token: str
    commands: Commands | None = None
    directory: Directory | None = None
    # called after a command stored something, so followers (router, stream) look at once
    stored: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        if self.commands is None:
            self.commands = Commands(self.store)
        if self.directory is None:
            self.directory = Directory(self.store, admin_token=self.admin_token)
        self._queue_skills: tuple[float, dict[str, str | None]] = (0.0, {})

    def queue_skills(self) -> dict[str, str | None]:
        """Queue name -> the skill it needs, from the directory view (kept a second)."""
        loaded_at, skills = self._queue_skills
        now = time.monotonic()
        if now - loaded_at > 1.0:
            skills = {q["name"]: q.get("skill") for q in directory.list_queues(self.read_models)}
            self._queue_skills = (now, skills)
        return skills


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.code, exc.message)


async def _not_found(_: Request, exc: Exception) -> Response:
    return _error(404, "not_found", str(exc))


async def _domain_error(_: Request, exc: Exception) -> Response:
    code = "conflict" if isinstance(exc, ConversationStateError | CustomerMergeError) else "refused"
    return _error(409, code, str(exc))


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, "http", str(exc.detail))


def _context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def _directory(request: Request) -> Directory:
    found = _context(request).directory
    assert found is not None
    return found


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer TOKEN")
    return token


def _allowed(principal: Principal | None, permission: str) -> Principal:
    """401 when nobody we know, 403 when their role may not do this."""
    if principal is None:
        raise ApiError(401, "unauthenticated", "unknown token")
    if not principal.may(permission):
        raise ApiError(403, "forbidden", f"a {principal.role} may not do this")
    return principal


async def _authenticate(request: Request, permission: str) -> Principal:
    """Who calls and whether their role may do this. The admin token is checked here; an
    agent's is looked up in the event store, in a worker thread."""
    token = _bearer(request)
    directory = _directory(request)
    principal = directory.builtin(token) or await _off_loop(directory.authenticate, token)
    return _allowed(principal, permission)


def _forbidden_queues(ctx: ApiContext, principal: Principal) -> list[str]:
    return [
        q
        for q, skill in ctx.queue_skills().items()
        if not can_work_on(principal, assignee=None, offered_to=None, queue=q, queue_skill=skill)
    ]


def _in_scope(ctx: ApiContext, principal: Principal, conversation_id: UUID) -> None:
    """403 when an agent reaches for a conversation outside their scope (404 if none)."""
    if principal.sees_everything:
        return
    conversation = ctx.store.get(conversation_id)
    if not isinstance(conversation, Conversation):
        raise ApiError(404, "not_found", f"no conversation {conversation_id}")
    queue = conversation.queue
    allowed = can_work_on(
        principal,
        assignee=conversation.assignee,
        offered_to=conversation.offered_to,
        queue=queue,
        queue_skill=None if queue is None else ctx.queue_skills().get(queue),
    )
    if not allowed:
        raise ApiError(403, "forbidden", "the conversation is not yours or your queues'")


def _timestamp(text: str, what: str) -> datetime:
    """An ISO 8601 instant; one without a zone is UTC."""
    try:
        return parse_instant(text)
    except (ValueError, OverflowError):  # OverflowError: year 1 with an offset
        raise ApiError(422, "invalid", f"{what} must be an ISO 8601 timestamp") from None


def _uuid(text: str, what: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise ApiError(404, "not_found", f"no {what} {text[:80]!r}") from None


async def _off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


# The inbox list, what agents load most, runs on one thread of its own: it takes about a
# millisecond, so it queues briefly there instead of six pool threads and the event loop
# passing the GIL back and forth (bench.inbox_api, closed loop of 200 clients: admin lists
# 278 -> 644 req/s, agents' 257 -> 472 req/s). Slower reads (a conversation's events,
# metrics, audit) stay on the default pool so they never hold it up.
_HOT_READS = ThreadPoolExecutor(1, thread_name_prefix="api-reads")


async def _hot_read(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_HOT_READS, fn, *args)


_STATUSES = {"open", "pending", "resolved", "all"}


def _no_nul(params: Mapping[str, str]) -> None:
    """(A NUL in a filter would reach PostgreSQL, which refuses it in text: a 500.)"""
    if any("\x00" in value for value in params.values()):
        raise ApiError(422, "invalid", "a query parameter holds a NUL character (U+0000)")


def _list_filters(params: Mapping[str, str]) -> dict[str, Any]:
    _no_nul(params)
    filters: dict[str, Any] = {}
    status = params.get("status")
    if status is not None:
        if status not in _STATUSES:
            raise ApiError(422, "invalid", f"status must be one of {', '.join(sorted(_STATUSES))}")
        filters["status"] = status
    channel = params.get("channel")
    if channel is not None:
        if channel not in CHANNELS:
            raise ApiError(422, "invalid", f"channel must be one of {', '.join(sorted(CHANNELS))}")
        filters["channel"] = channel
    for name in ("assignee", "queue"):
        if params.get(name):
            filters[name] = params[name]
    customer = params.get("customer")
    if customer:
        if ":" in customer:
            try:
                filters["customer"] = parse_key(customer)
            except InvalidIdentity as exc:
                raise ApiError(422, "invalid", f"customer: {exc}") from None
        else:
            filters["customer"] = str(_uuid(customer, "customer"))
    limit = params.get("limit", "50")
    # (isdigit alone takes "²", which int() does not)
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 500:
        raise ApiError(422, "invalid", "limit must be an integer from 1 to 500")
    filters["limit"] = int(limit)
    if params.get("cursor"):
        filters["cursor"] = params["cursor"]
    return filters


def _inbox_page(
    ctx: ApiContext, token: str, principal: Principal | None, params: Mapping[str, str]
) -> dict[str, Any]:
    """The caller's inbox page, all in one worker thread: each hop between the event loop
    and a thread costs about half a millisecond of a loaded process, as much as the query."""
    assert ctx.directory is not None
    if principal is None:
        principal = ctx.directory.authenticate(token)
    principal = _allowed(principal, "conversations.read")
    filters = _list_filters(params)
    if filters.get("assignee") == "me":
        filters["assignee"] = principal.agent_id
    if not principal.sees_everything:
        filters["scope"] = (principal.agent_id, _forbidden_queues(ctx, principal))
    try:
        page: dict[str, Any] = inbox_view.list_conversations(ctx.read_models, **filters)
    except ValueError as exc:  # a cursor that is not one of ours
        raise ApiError(422, "invalid", str(exc)) from None
    return page


async def list_conversations(request: Request) -> Response:
    token = _bearer(request)
    principal = _directory(request).builtin(token)
    ctx = _context(request)
    return JSONResponse(await _hot_read(_inbox_page, ctx, token, principal, request.query_params))


async def get_conversation(request: Request) -> Response:
    as_of = request.query_params.get("as_of")
    # the past of a conversation is audit history: auditors' and supervisors', not agents'
    principal = await _authenticate(
        request, "conversations.read" if as_of is None else "conversations.audit"
    )
    conversation_id = _uuid(request.path_params["id"], "conversation")
    ctx = _context(request)
    if as_of is not None:
        at = _timestamp(as_of, "as_of")
        past = await _off_loop(audit.conversation_as_of, ctx.store, conversation_id, at)
        if past is None:
            raise ApiError(404, "not_found", f"no conversation {conversation_id} at {as_of}")
        return JSONResponse(past)
    await _off_loop(_in_scope, ctx, principal, conversation_id)
    await _timeline_caught_up(ctx.read_models, str(conversation_id))
    item = await _off_loop(timeline.get_conversation, ctx.read_models, str(conversation_id))
    if item is None:
        raise ApiError(404, "not_found", f"no conversation {conversation_id}")
    return JSONResponse(item)


# The timeline's runner follows the inbox view's (projections/runner.py), so a conversation's
# item can be a moment newer than its timeline. A page waits, at most this long, until the
# timeline has applied the last event that changed the item.
_TIMELINE_WAIT = 2.0


def _item_and_timeline_positions(db: ReadModelDB, conversation_id: str) -> tuple[int, int]:
    with db.read() as tx:
        item_at = inbox_view.item_position(tx, conversation_id)
        timeline_at = tracking.active_positions(tx).get(timeline.NAME, item_at)
    return item_at, timeline_at


async def _timeline_caught_up(db: ReadModelDB, conversation_id: str) -> None:
    item_at, timeline_at = await _off_loop(_item_and_timeline_positions, db, conversation_id)
    deadline = time.monotonic() + _TIMELINE_WAIT
    while timeline_at < item_at and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        _, timeline_at = await _off_loop(_item_and_timeline_positions, db, conversation_id)


async def conversation_events(request: Request) -> Response:
    await _authenticate(request, "conversations.audit")
    conversation_id = _uuid(request.path_params["id"], "conversation")
    entries = await _off_loop(audit.history, _context(request).store, conversation_id)
    if not entries or entries[0]["aggregate"] != "Conversation":
        raise ApiError(404, "not_found", f"no conversation {conversation_id}")
    return JSONResponse({"items": entries})


async def get_customer(request: Request) -> Response:
    principal = await _authenticate(request, "customers.read")
    customer_id = _uuid(request.path_params["id"], "customer")
    ctx = _context(request)
    customer = await _off_loop(inbox_view.get_customer, ctx.read_models, str(customer_id))
    if customer is None:
        raise ApiError(404, "not_found", f"no customer {customer_id}")
    if not principal.sees_everything:
        # An agent sees the customers they serve (with their whole history: that is what
        # they serve them with), not any customer by id.
        # (the newest 100: one store read each, and whoever serves them has a recent one)
        ids = [UUID(c["id"]) for c in customer["conversations"][:100]]
        if not await _off_loop(_any_in_scope, ctx, principal, ids):
            raise ApiError(403, "forbidden", "none of the customer's conversations is yours")
    return JSONResponse(customer)


def _any_in_scope(ctx: ApiContext, principal: Principal, conversation_ids: list[UUID]) -> bool:
    for conversation_id in conversation_ids:
        try:
            _in_scope(ctx, principal, conversation_id)
        except ApiError:
            continue
        return True
    return False


async def _body(request: Request, *required: str) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    if holds_nul(body):  # (PostgreSQL's text cannot hold it, nor the read models built on it)
        raise ApiError(422, "invalid", "the body holds a NUL character (U+0000)")
    for name in required:
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ApiError(422, "invalid", f"{name} is required (a non-empty string)")
    return body


def _commands(request: Request) -> Commands:
    commands = _context(request).commands
    assert commands is not None
    return commands


def _changed(conversation: Any, status: int = 200, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {
            "id": str(conversation.id),
            "status": conversation.status,
            "version": conversation.version,
            "assignee": conversation.assignee,
            "queue": conversation.queue,
            **extra,
        },
        status_code=status,
    )


_CONVERSATION_COMMANDS: dict[str, tuple[str, ...]] = {
    "notes": ("text",),
    "assign": ("agent",),
    "accept": (),
    "decline": (),
    "transfer": ("queue",),
    "escalate": ("reason",),
    "resolve": (),
    "reopen": (),
    "pending": (),
}


def _assignee(principal: Principal, wanted: str) -> tuple[str, bool]:
    """(agent, claim): an agent may only take a conversation for themselves, and only when
    nobody has it; supervisors and admins assign anyone, over someone else."""
    agent = principal.agent_id if wanted == "me" else wanted
    if principal.sees_everything:
        return agent, False
    if agent != principal.agent_id:
        raise ApiError(403, "forbidden", "an agent assigns conversations only to themselves")
    return agent, True


async def conversation_command(request: Request) -> Response:
    command = request.path_params["command"]
    if command not in _CONVERSATION_COMMANDS:
        raise ApiError(404, "not_found", f"no command {command!r}")
    principal = await _authenticate(request, "conversations.act")
    conversation_id = _uuid(request.path_params["id"], "conversation")
    body = await _body(request, *_CONVERSATION_COMMANDS[command])
    ctx = _context(request)
    await _off_loop(_in_scope, ctx, principal, conversation_id)
    commands = _commands(request)
    actor = principal.agent_id

    def assign() -> Any:
        agent, claim = _assignee(principal, body["agent"])
        if agent != principal.agent_id and _directory(request).agent(agent) is None:
            # (nobody would ever see it: it would leave every agent's view)
            raise ApiError(422, "invalid", f"no agent {agent!r}")
        return commands.assign(conversation_id, agent, actor=actor, claim=claim)

    # (as IVR menus name queues: any printable name, defined or not, which any agent takes)
    if command == "transfer" and not (len(body["queue"]) <= 64 and body["queue"].isprintable()):
        raise ApiError(422, "invalid", "queue must be 1-64 printable characters")

    act: dict[str, Callable[[], Any]] = {
        "notes": lambda: commands.add_note(conversation_id, body["text"], actor=actor),
        "assign": assign,
        "accept": lambda: commands.accept_offer(conversation_id, actor),
        "decline": lambda: commands.decline_offer(conversation_id, actor),
        "transfer": lambda: commands.transfer(conversation_id, body["queue"], actor=actor),
        "escalate": lambda: commands.escalate(conversation_id, body["reason"], actor=actor),
        "resolve": lambda: commands.resolve(conversation_id, actor=actor),
        "reopen": lambda: commands.reopen(conversation_id, actor=actor),
        "pending": lambda: commands.mark_pending(conversation_id, actor=actor),
    }
    conversation = await _off_loop(act[command])
    ctx.stored()
    return _changed(conversation, 201 if command == "notes" else 200)


_REPLY_CHANNELS = CHANNELS - {"voice"}


async def reply(request: Request) -> Response:
    principal = await _authenticate(request, "conversations.act")
    conversation_id = _uuid(request.path_params["id"], "conversation")
    body = await _body(request, "text")
    channel = body.get("channel")
    if channel is not None and channel not in _REPLY_CHANNELS:
        raise ApiError(
            422, "invalid", f"channel must be one of {', '.join(sorted(_REPLY_CHANNELS))}"
        )
    ctx = _context(request)
    await _off_loop(_in_scope, ctx, principal, conversation_id)
    conversation, message_id = await _off_loop(
        _commands(request).reply,
        conversation_id,
        body["text"],
        channel=channel,
        actor=principal.agent_id,
    )
    ctx.stored()
    return _changed(conversation, 202, message_id=message_id)


async def merge_customers(request: Request) -> Response:
    principal = await _authenticate(request, "customers.merge")
    customer_id = _uuid(request.path_params["id"], "customer")
    body = await _body(request, "other")
    other = _uuid(body["other"], "customer")
    survivor = await _off_loop(
        _commands(request).merge, customer_id, other, actor=principal.agent_id
    )
    return JSONResponse({"id": str(survivor.id), "identities": survivor.identities})


async def unmerge_customer(request: Request) -> Response:
    principal = await _authenticate(request, "customers.merge")
    customer_id = _uuid(request.path_params["id"], "customer")
    body = await _body(request, "identity")
    try:
        identity = parse_key(body["identity"])
    except InvalidIdentity as exc:
        raise ApiError(422, "invalid", f"identity: {exc}") from None
    restored = await _off_loop(
        _commands(request).unmerge, customer_id, identity, actor=principal.agent_id
    )
    return JSONResponse({"id": str(restored.id), "identities": restored.identities})


async def set_vip(request: Request) -> Response:
    principal = await _authenticate(request, "customers.vip")
    customer_id = _uuid(request.path_params["id"], "customer")
    body = await _body(request)
    vip = body.get("vip")
    if not isinstance(vip, bool):
        raise ApiError(422, "invalid", "vip must be true or false")
    customer = await _off_loop(
        _commands(request).set_vip, customer_id, vip, actor=principal.agent_id
    )
    _context(request).stored()
    return JSONResponse({"id": str(customer.id), "vip": customer.vip})


# -- agents and queues ---------------------------------------------------------------------


async def create_agent(request: Request) -> Response:
    principal = await _authenticate(request, "agents.manage")
    body = await _body(request, "id")
    try:
        profile = agent_profile(body)
        token = await _off_loop(
            _directory(request).register, body["id"], profile, actor=principal.agent_id
        )
    except InvalidSpec as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    except AlreadyExists as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    _context(request).stored()
    return JSONResponse({"id": body["id"], "token": token, **profile}, status_code=201)


async def list_agents(request: Request) -> Response:
    await _authenticate(request, "agents.read")
    agents = await _off_loop(directory.list_agents, _context(request).read_models)
    return JSONResponse({"items": agents})


async def update_agent(request: Request) -> Response:
    principal = await _authenticate(request, "agents.manage")
    agent_id = request.path_params["id"]
    body = await _body(request)
    try:
        profile = agent_profile(body)
        agent = await _off_loop(
            _directory(request).change_profile, agent_id, profile, actor=principal.agent_id
        )
    except InvalidSpec as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    _context(request).stored()
    return JSONResponse({"id": agent.agent_id, **profile})


async def replace_token(request: Request) -> Response:
    principal = await _authenticate(request, "agents.manage")
    agent_id = request.path_params["id"]
    try:
        token = await _off_loop(
            _directory(request).replace_token, agent_id, actor=principal.agent_id
        )
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return JSONResponse({"id": agent_id, "token": token})


async def set_presence(request: Request) -> Response:
    principal = await _authenticate(request, "presence.own")
    body = await _body(request, "status")
    try:
        agent = await _off_loop(
            _directory(request).set_presence,
            principal.agent_id,
            body["status"],
            reason="set by the agent",
            actor=principal.agent_id,
        )
    except InvalidSpec as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    _context(request).stored()
    return JSONResponse(
        {"id": agent.agent_id, "status": agent.presence, "since": agent.presence_since}
    )


async def list_queues(request: Request) -> Response:
    await _authenticate(request, "queues.read")
    queues = await _off_loop(directory.list_queues, _context(request).read_models)
    return JSONResponse({"items": queues})


async def put_queue(request: Request) -> Response:
    principal = await _authenticate(request, "queues.manage")
    name = request.path_params["name"]
    body = await _body(request)
    try:
        spec = queue_spec(name, body)
    except InvalidSpec as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    created = await _off_loop(
        _directory(request).define_queue, name, spec, actor=principal.agent_id
    )
    _context(request).stored()
    return JSONResponse({"name": name, **spec}, status_code=201 if created else 200)


async def escalations(request: Request) -> Response:
    await _authenticate(request, "escalations.read")
    queues = await _off_loop(escalation_queues, _context(request).read_models)
    return JSONResponse({"queues": queues})


async def kpis(request: Request) -> Response:
    """`GET /api/v1/metrics?from&to&bucket&channel&queue&agent&tz&sl` (CONTRACT's KPIs);
    default: the last 24 hours by hour, UTC, service level within 20 s."""
    await _authenticate(request, "metrics.read")
    params = request.query_params
    _no_nul(params)
    end = _timestamp(params["to"], "to") if "to" in params else datetime.now(UTC)
    try:
        start = _timestamp(params["from"], "from") if "from" in params else end - timedelta(days=1)
    except OverflowError:  # `to` in year 1, and no `from`
        raise ApiError(422, "invalid", "to is too early to count a day back from") from None
    try:
        service_level = float(params.get("sl", "20"))
    except ValueError:
        raise ApiError(422, "invalid", "sl must be a number of seconds") from None
    try:
        result = await _off_loop(
            metrics,
            _context(request).read_models,
            start=start,
            end=end,
            bucket=params.get("bucket", "hour"),
            tz=params.get("tz", "UTC"),
            channel=params.get("channel"),
            queue=params.get("queue"),
            agent=params.get("agent"),
            service_level_seconds=service_level,
        )
    except ValueError as exc:  # QueryError: a bad bucket, zone, range or T
        raise ApiError(400, "bad_query", str(exc)) from None
    return JSONResponse(result)


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def prometheus(request: Request) -> Response:
    ctx = _context(request)
    telemetry.STORE_POSITION.set(await _off_loop(ctx.store.max_notification_id))
    for name, position in (await _off_loop(tracking.positions, ctx.read_models)).items():
        telemetry.PROJECTION_POSITION.labels(name).set(position)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz),
        Route("/metrics", prometheus),
        Route("/api/v1/agents", create_agent, methods=["POST"]),
        Route("/api/v1/agents", list_agents, methods=["GET"]),
        Route("/api/v1/agents/me/presence", set_presence, methods=["PUT"]),
        Route("/api/v1/agents/{id}", update_agent, methods=["PUT"]),
        Route("/api/v1/agents/{id}/token", replace_token, methods=["POST"]),
        Route("/api/v1/queues", list_queues, methods=["GET"]),
        Route("/api/v1/queues/{name}", put_queue, methods=["PUT"]),
        Route("/api/v1/conversations", list_conversations),
        Route("/api/v1/conversations/{id}", get_conversation),
        Route("/api/v1/conversations/{id}/events", conversation_events),
        Route("/api/v1/conversations/{id}/replies", reply, methods=["POST"]),
        Route("/api/v1/conversations/{id}/{command}", conversation_command, methods=["POST"]),
        Route("/api/v1/customers/{id}", get_customer),
        Route("/api/v1/customers/{id}/merge", merge_customers, methods=["POST"]),
        Route("/api/v1/customers/{id}/unmerge", unmerge_customer, methods=["POST"]),
        Route("/api/v1/customers/{id}/vip", set_vip, methods=["POST"]),
        Route("/api/v1/escalations", escalations),
        Route("/api/v1/metrics", kpis),
    ]


def create_app(
    ctx: ApiContext,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    lifespan: Lifespan | None = None,
) -> Starlette:
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: _api_error,
        NotFound: _not_found,
        DomainError: _domain_error,
        HTTPException: _http_error,
    }
    app = Starlette(
        routes=[*routes(), *extra_routes],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    return app
