"""Every role against every endpoint of the agent API, over real HTTP on the whole stack:
allowed, 401 without a valid token, 403 outside the role. Then agents at work: routing offers
a chat to the available agent, a second agent cannot take it (409), an agent sees only their
own and their queues' conversations."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
import websockets

from tests.e2e.conftest import Stack, listed
from tests.support import contact_event, produce

ROLES = ("admin", "supervisor", "agent", "auditor")
UNKNOWN = "00000000-0000-0000-0000-000000000000"

# (method, path, body, roles allowed). Paths name an unknown id where one is needed: an
# allowed role then gets 404 (or 409/422), never 401/403; the role check comes first.
ENDPOINTS: list[tuple[str, str, Any, frozenset[str]]] = [
    ("POST", "/api/v1/agents", {"id": "x1", "name": "X"}, frozenset({"admin"})),
    ("GET", "/api/v1/agents", None, frozenset({"admin", "supervisor"})),
    ("PUT", "/api/v1/agents/nobody", {"name": "N"}, frozenset({"admin"})),
    ("POST", "/api/v1/agents/nobody/token", None, frozenset({"admin"})),
    ("PUT", "/api/v1/agents/me/presence", {"status": "away"}, frozenset({"supervisor", "agent"})),
    ("GET", "/api/v1/queues", None, frozenset({"admin", "supervisor"})),
    ("PUT", "/api/v1/queues/billing", {"skill": "billing"}, frozenset({"admin"})),
    ("GET", "/api/v1/conversations", None, frozenset({"admin", "supervisor", "agent"})),
    ("GET", f"/api/v1/conversations/{UNKNOWN}", None, frozenset({"admin", "supervisor", "agent"})),
    (
        "GET",
        f"/api/v1/conversations/{UNKNOWN}?as_of=2026-11-27T10:00:00Z",
        None,
        frozenset({"admin", "supervisor", "auditor"}),
    ),
    (
        "GET",
        f"/api/v1/conversations/{UNKNOWN}/events",
        None,
        frozenset({"admin", "supervisor", "auditor"}),
    ),
    *[
        (
            "POST",
            f"/api/v1/conversations/{UNKNOWN}/{command}",
            body,
            frozenset({"admin", "supervisor", "agent"}),
        )
        for command, body in [
            ("replies", {"text": "hi"}),
            ("notes", {"text": "n"}),
            ("assign", {"agent": "me"}),
            ("accept", None),
            ("decline", None),
            ("transfer", {"queue": "billing"}),
            ("escalate", {"reason": "angry"}),
            ("resolve", None),
            ("reopen", None),
            ("pending", None),
        ]
    ],
    ("GET", f"/api/v1/customers/{UNKNOWN}", None, frozenset({"admin", "supervisor", "agent"})),
    (
        "POST",
        f"/api/v1/customers/{UNKNOWN}/merge",
        {"other": UNKNOWN},
        frozenset({"admin", "supervisor"}),
    ),
    (
        "POST",
        f"/api/v1/customers/{UNKNOWN}/unmerge",
        {"identity": "email:a@example.com"},
        frozenset({"admin", "supervisor"}),
    ),
    ("POST", f"/api/v1/customers/{UNKNOWN}/vip", {"vip": True}, frozenset({"admin", "supervisor"})),
    ("GET", "/api/v1/escalations", None, frozenset({"admin", "supervisor"})),
    ("GET", "/api/v1/metrics", None, frozenset({"admin", "supervisor", "auditor"})),
]


async def _agent(stack: Stack, agent_id: str, role: str, **profile: Any) -> str:
    body = {"id": agent_id, "name": agent_id.title(), "role": role, **profile}
    response = await stack.post("/api/v1/agents", body)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    assert token.startswith(f"{agent_id}.")
    return token


async def _call(
    stack: Stack, method: str, path: str, body: Any, token: str | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {"Authorization": ""}
    return await stack.client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_every_role_against_every_endpoint(stack: Stack) -> None:
    tokens = {"admin": stack.settings.admin_token}
    for role in ROLES[1:]:
        tokens[role] = await _agent(stack, f"the-{role}", role, capacity={"chat": 1})
    checked = 0
    for method, path, body, allowed in ENDPOINTS:
        assert (await _call(stack, method, path, body, None)).status_code == 401, path
        assert (await _call(stack, method, path, body, "the-agent.wrong")).status_code == 401
        for role in ROLES:
            response = await _call(stack, method, path, body, tokens[role])
            if role in allowed:
                assert response.status_code not in (401, 403), (method, path, role, response.text)
            else:
                assert response.status_code == 403, (method, path, role, response.text)
                assert response.json()["error"]["code"] == "forbidden"
            checked += 1
    assert checked == len(ENDPOINTS) * len(ROLES)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_replaced_token_stops_working_at_once(stack: Stack) -> None:
    old = await _agent(stack, "ann", "agent")
    assert (await _call(stack, "GET", "/api/v1/conversations", None, old)).status_code == 200
    new = (await stack.post("/api/v1/agents/ann/token")).json()["token"]
    assert (await _call(stack, "GET", "/api/v1/conversations", None, old)).status_code == 401
    assert (await _call(stack, "GET", "/api/v1/conversations", None, new)).status_code == 200


async def test_routing_offers_a_chat_and_one_agent_wins_it(stack: Stack) -> None:
    ann = await _agent(stack, "ann", "agent", capacity={"chat": 1})
    bob = await _agent(stack, "bob", "agent", capacity={"chat": 1})
    presence = await _call(stack, "PUT", "/api/v1/agents/me/presence", {"status": "available"}, ann)
    assert presence.json()["status"] == "available"
    assert stack.settings.kafka_bootstrap is not None
    await produce(
        stack.settings.kafka_bootstrap,
        stack.settings.contact_events_topic,
        [contact_event("chat-1", channel="chat", customer={"visitor": "v-1"})],
    )
    (item,) = await listed(stack, 1)
    cid = item["id"]

    async def offered() -> dict[str, Any]:
        for _ in range(400):
            page: dict[str, Any] = (
                await _call(stack, "GET", "/api/v1/conversations", None, ann)
            ).json()
            offers: list[dict[str, Any]] = [i for i in page["items"] if i["offered_to"] == "ann"]
            if offers:
                return offers[0]
            await asyncio.sleep(0.05)
        raise AssertionError("no offer reached ann")

    offer = await offered()
    assert offer["id"] == cid
    assert offer["queue"] == "default"

    accepted = await _call(stack, "POST", f"/api/v1/conversations/{cid}/accept", None, ann)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["assignee"] == "ann"
    late = await _call(stack, "POST", f"/api/v1/conversations/{cid}/assign", {"agent": "me"}, bob)
    assert late.status_code == 403  # assigned to ann: outside bob's scope now
    assert (await _call(stack, "GET", f"/api/v1/conversations/{cid}", None, bob)).status_code == 403
    # and so is the customer: ann sees who she serves, bob cannot look them up
    customer = f"/api/v1/customers/{item['customer']['id']}"
    assert (await _call(stack, "GET", customer, None, ann)).status_code == 200
    assert (await _call(stack, "GET", customer, None, bob)).status_code == 403

    # the list is a projection: wait until it shows the assignment, then compare
    for _ in range(400):
        mine = (await _call(stack, "GET", "/api/v1/conversations", None, ann)).json()["items"]
        if [i["assignee"] for i in mine] == ["ann"]:
            break
        await asyncio.sleep(0.05)
    assert [i["id"] for i in mine] == [cid]
    theirs = (await _call(stack, "GET", "/api/v1/conversations", None, bob)).json()["items"]
    assert theirs == []


async def test_two_agents_claiming_at_once_one_gets_409(stack: Stack) -> None:
    ann = await _agent(stack, "ann", "agent")
    bob = await _agent(stack, "bob", "agent")
    assert stack.settings.kafka_bootstrap is not None
    await produce(
        stack.settings.kafka_bootstrap,
        stack.settings.contact_events_topic,
        [contact_event("sms-1", customer={"phone": "+14155550100"})],
    )
    # An agent may claim only what routing has put in a queue: wait until it has.
    (item,) = await listed(stack, 1, queue="default")
    path = f"/api/v1/conversations/{item['id']}/assign"
    results = await asyncio.gather(
        _call(stack, "POST", path, {"agent": "me"}, ann),
        _call(stack, "POST", path, {"agent": "me"}, bob),
    )
    codes = sorted(r.status_code for r in results)
    # the loser sees 409 (state conflict), or 403 when it read the winner's assignment first
    assert codes[0] == 200, [r.text for r in results]
    assert codes[1] in (403, 409), [r.text for r in results]


async def test_the_stream_brings_the_offer_and_a_resume_brings_what_was_missed(
    stack: Stack,
) -> None:
    ann = await _agent(stack, "ann", "agent", capacity={"chat": 1})
    port = stack.settings.http_port
    url = f"ws://127.0.0.1:{port}/api/v1/stream?token={ann}"
    async with websockets.connect(url) as socket:
        hello = orjson.loads(await socket.recv())
        assert hello["type"] == "hello"
        await _call(stack, "PUT", "/api/v1/agents/me/presence", {"status": "available"}, ann)
        assert stack.settings.kafka_bootstrap is not None
        await produce(
            stack.settings.kafka_bootstrap,
            stack.settings.contact_events_topic,
            [contact_event("chat-s", channel="chat", customer={"visitor": "v-s"})],
        )
        frames: list[dict[str, Any]] = []
        while not any(f["type"] == "offer" for f in frames):
            frame = orjson.loads(await asyncio.wait_for(socket.recv(), 20))
            if frame["type"] != "heartbeat":
                frames.append(frame)
    offer = next(f for f in frames if f["type"] == "offer")
    assert offer["agent"] == "ann" or offer["data"].get("agent") == "ann"
    cursors = [f["cursor"] for f in frames]
    assert cursors == sorted(set(cursors))  # in order, none twice

    cid = offer["conversation"]
    await _call(stack, "POST", f"/api/v1/conversations/{cid}/accept", None, ann)
    async with websockets.connect(f"{url}&after={cursors[-1]}") as socket:
        missed: list[dict[str, Any]] = []
        while not any(f["type"] == "assignment" for f in missed):
            frame = orjson.loads(await asyncio.wait_for(socket.recv(), 20))
            if frame["type"] not in ("hello", "heartbeat"):
                missed.append(frame)
    assert all(f["cursor"] > cursors[-1] for f in missed)
    assert missed[-1]["conversation"] == cid
