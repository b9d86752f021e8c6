"""A call through the whole stack: Twilio's webhooks (signed, driven by the call simulator),
the IVR, Kafka, the ingest worker, routing, an agent accepting the offer over the API, and the
call connector putting the caller through with Twilio's REST API (a local stand-in)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.broker import free_port
from tests.e2e.conftest import Stack
from tests.twilio_rest_stub import TwilioRestStub, running_stub
from tests.voice_sim import CallSimulator, FakeClock, HangUp, Hold, Press

ACCOUNT = "AC" + "1" * 32
TOKEN = "twilio-auth-token"
OUR_NUMBER = "+15005550006"
CALLER = "+14155550123"
ANN_PHONE = "+14155550999"

MENU = """
[menu]
start = "main"
default_language = "en"
repeats = 1
timeout = 5

[languages.en]
locale = "en-US"
voice = "Polly.Joanna"

[nodes.main]
prompt.en = "For billing, press 1."
default = { action = "hangup" }

[[nodes.main.options]]
digit = "1"
action = "queue"
queue = "billing"
skill = "billing"
"""


@pytest.fixture
async def stub() -> AsyncIterator[TwilioRestStub]:
    async with running_stub(ACCOUNT, TOKEN, clock=lambda: datetime.now(UTC)) as running:
        yield running


@pytest.fixture
def stack_env(stub: TwilioRestStub, tmp_path: Path) -> dict[str, str]:
    menu = tmp_path / "menu.toml"
    menu.write_text(MENU)
    port = free_port()  # Twilio signs for the public URL: it must be where we listen
    return {
        "INBOX_HTTP_PORT": str(port),
        "INBOX_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_API_BASE": stub.url,
        "TWILIO_CALLER_ID": OUR_NUMBER,
        "INBOX_IVR_CONFIG": str(menu),
    }


async def _as(stack: Stack, token: str, method: str, path: str, body: Any = None) -> Any:
    response = await stack.client.request(
        method, path, json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code < 300, response.text
    return response.json()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_caller_is_queued_offered_to_an_agent_and_put_through(
    stack: Stack, stub: TwilioRestStub
) -> None:
    created = await stack.post(
        "/api/v1/agents",
        {
            "id": "ann",
            "name": "Ann",
            "role": "agent",
            "skills": ["billing"],
            "capacity": {"voice": 1},
            "voice_to": ANN_PHONE,
        },
    )
    ann = created.json()["token"]
    await _as(stack, ann, "PUT", "/api/v1/agents/me/presence", {"status": "available"})
    call = stub.add_call(CALLER, OUR_NUMBER, status="in-progress")
    public = stack.settings.public_url

    async def pace(request: httpx.Request) -> None:
        if request.url.path.endswith("/wait"):  # Twilio plays hold music between loops
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=10, event_hooks={"request": [pace]}) as client:
        simulator = CallSimulator(
            client=client,
            base_url=public,
            token=TOKEN,
            clock=FakeClock(datetime.now(UTC)),
            call_sid=call.sid,
            caller=CALLER,
            to=OUR_NUMBER,
        )
        calling = asyncio.create_task(simulator.call([Press("1"), *[Hold()] * 400, HangUp()]))

        async def offered() -> str:
            for _ in range(400):
                page = await _as(stack, ann, "GET", "/api/v1/conversations")
                mine = [i for i in page["items"] if i["offered_to"] == "ann"]
                if mine:
                    return str(mine[0]["id"])
                await asyncio.sleep(0.05)
            raise AssertionError("the call was never offered to ann")

        cid = await offered()
        accepted = await _as(stack, ann, "POST", f"/api/v1/conversations/{cid}/accept")
        assert accepted["assignee"] == "ann"

        for _ in range(400):  # the connector redirects the live call to ann's phone
            if call.updates:
                break
            await asyncio.sleep(0.05)
        (twiml,) = call.updates
        assert "<Dial" in twiml
        assert ANN_PHONE in twiml
        calling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await calling

    for _ in range(400):  # call.answered comes back through Kafka into the timeline
        detail = await _as(stack, ann, "GET", f"/api/v1/conversations/{cid}")
        activities = [e["data"]["activity"] for e in detail["timeline"] if "activity" in e["data"]]
        if "call.answered" in activities:
            break
        await asyncio.sleep(0.05)
    assert activities[:1] == ["call.started"]
    assert "call.queued" in activities
    assert "call.answered" in activities
    heard = " ".join(simulator.heard)
    assert "billing" in heard.lower()
    assert stub.refused_auth == 0
