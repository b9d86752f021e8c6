"""The HTTP API (Starlette): agent API, health and Prometheus metrics.

Routes read projections or the event store from a worker thread (both are synchronous);
errors are JSON `{"error": {"code", "message"}}` mapped in one place.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
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
from inbox.commands import Commands, NotFound
from inbox.domain.errors import ConversationStateError, CustomerMergeError, DomainError
from inbox.identity import InvalidIdentity, parse_key
from infra.store import EventStore
from projections import inbox_view, timeline, tracking
from projections.db import ReadModelDB

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

    def __post_init__(self) -> None:
        if self.commands is None:
            self.commands = Commands(self.store)


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


def _authenticate(request: Request) -> str:
    """The caller's role. Issue 2 knows the admin token only; agents come with their roles."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer TOKEN")
    if hmac.compare_digest(token.encode(), _context(request).admin_token.encode()):
        return "admin"
    raise ApiError(401, "unauthenticated", "unknown token")


def _uuid(text: str, what: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise ApiError(404, "not_found", f"no {what} {text[:80]!r}") from None


async def _off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


_STATUSES = {"open", "pending", "resolved", "all"}
_CHANNELS = {"email", "voice", "sms", "whatsapp", "messenger", "instagram", "chat"}


def _list_filters(params: Mapping[str, str]) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    status = params.get("status")
    if status is not None:
        if status not in _STATUSES:
            raise ApiError(422, "invalid", f"status must be one of {', '.join(sorted(_STATUSES))}")
        filters["status"] = status
    channel = params.get("channel")
    if channel is not None:
        if channel not in _CHANNELS:
            raise ApiError(422, "invalid", f"channel must be one of {', '.join(sorted(_CHANNELS))}")
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
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise ApiError(422, "invalid", "limit must be an integer from 1 to 500")
    filters["limit"] = int(limit)
    if params.get("cursor"):
        filters["cursor"] = params["cursor"]
    return filters


async def list_conversations(request: Request) -> Response:
    _authenticate(request)
    filters = _list_filters(request.query_params)
    try:
        page = await _off_loop(
            inbox_view.list_conversations, _context(request).read_models, **filters
        )
    except ValueError as exc:  # a cursor that is not one of ours
        raise ApiError(422, "invalid", str(exc)) from None
    return JSONResponse(page)


async def get_conversation(request: Request) -> Response:
    _authenticate(request)
    conversation_id = _uuid(request.path_params["id"], "conversation")
    item = await _off_loop(
        timeline.get_conversation, _context(request).read_models, str(conversation_id)
    )
    if item is None:
        raise ApiError(404, "not_found", f"no conversation {conversation_id}")
    return JSONResponse(item)


async def conversation_events(request: Request) -> Response:
    _authenticate(request)
    conversation_id = _uuid(request.path_params["id"], "conversation")
    entries = await _off_loop(audit.history, _context(request).store, conversation_id)
    if not entries or entries[0]["aggregate"] != "Conversation":
        raise ApiError(404, "not_found", f"no conversation {conversation_id}")
    return JSONResponse({"items": entries})


async def get_customer(request: Request) -> Response:
    _authenticate(request)
    customer_id = _uuid(request.path_params["id"], "customer")
    customer = await _off_loop(
        inbox_view.get_customer, _context(request).read_models, str(customer_id)
    )
    if customer is None:
        raise ApiError(404, "not_found", f"no customer {customer_id}")
    return JSONResponse(customer)


async def _body(request: Request, *required: str) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
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
            **extra,
        },
        status_code=status,
    )


_CONVERSATION_COMMANDS: dict[str, tuple[str, ...]] = {
    "notes": ("text",),
    "assign": ("agent",),
    "transfer": ("queue",),
    "escalate": ("reason",),
    "resolve": (),
    "reopen": (),
    "pending": (),
}


async def conversation_command(request: Request) -> Response:
    role = _authenticate(request)
    conversation_id = _uuid(request.path_params["id"], "conversation")
    command = request.path_params["command"]
    if command not in _CONVERSATION_COMMANDS:
        raise ApiError(404, "not_found", f"no command {command!r}")
    body = await _body(request, *_CONVERSATION_COMMANDS[command])
    commands = _commands(request)
    actor = role
    act: dict[str, Callable[[], Any]] = {
        "notes": lambda: commands.add_note(conversation_id, body["text"], actor=actor),
        "assign": lambda: commands.assign(conversation_id, body["agent"], actor=actor),
        "transfer": lambda: commands.transfer(conversation_id, body["queue"], actor=actor),
        "escalate": lambda: commands.escalate(conversation_id, body["reason"], actor=actor),
        "resolve": lambda: commands.resolve(conversation_id, actor=actor),
        "reopen": lambda: commands.reopen(conversation_id, actor=actor),
        "pending": lambda: commands.mark_pending(conversation_id, actor=actor),
    }
    conversation = await _off_loop(act[command])
    return _changed(conversation, 201 if command == "notes" else 200)


_REPLY_CHANNELS = _CHANNELS - {"voice"}


async def reply(request: Request) -> Response:
    role = _authenticate(request)
    conversation_id = _uuid(request.path_params["id"], "conversation")
    body = await _body(request, "text")
    channel = body.get("channel")
    if channel is not None and channel not in _REPLY_CHANNELS:
        raise ApiError(
            422, "invalid", f"channel must be one of {', '.join(sorted(_REPLY_CHANNELS))}"
        )
    conversation, message_id = await _off_loop(
        _commands(request).reply, conversation_id, body["text"], channel=channel, actor=role
    )
    return _changed(conversation, 202, message_id=message_id)


async def merge_customers(request: Request) -> Response:
    role = _authenticate(request)
    customer_id = _uuid(request.path_params["id"], "customer")
    body = await _body(request, "other")
    other = _uuid(body["other"], "customer")
    survivor = await _off_loop(_commands(request).merge, customer_id, other, actor=role)
    return JSONResponse({"id": str(survivor.id), "identities": survivor.identities})


async def unmerge_customer(request: Request) -> Response:
    role = _authenticate(request)
    customer_id = _uuid(request.path_params["id"], "customer")
    body = await _body(request, "identity")
    try:
        identity = parse_key(body["identity"])
    except InvalidIdentity as exc:
        raise ApiError(422, "invalid", f"identity: {exc}") from None
    restored = await _off_loop(_commands(request).unmerge, customer_id, identity, actor=role)
    return JSONResponse({"id": str(restored.id), "identities": restored.identities})


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
        Route("/api/v1/conversations", list_conversations),
        Route("/api/v1/conversations/{id}", get_conversation),
        Route("/api/v1/conversations/{id}/events", conversation_events),
        Route("/api/v1/conversations/{id}/replies", reply, methods=["POST"]),
        Route("/api/v1/conversations/{id}/{command}", conversation_command, methods=["POST"]),
        Route("/api/v1/customers/{id}", get_customer),
        Route("/api/v1/customers/{id}/merge", merge_customers, methods=["POST"]),
        Route("/api/v1/customers/{id}/unmerge", unmerge_customer, methods=["POST"]),
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
