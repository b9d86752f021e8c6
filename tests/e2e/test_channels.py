"""Every channel in and out, end to end, through the whole stack: a real SMTP session, a signed
Twilio webhook, a websocket client; replies through the API out to local stand-ins for the
relay and Twilio's REST API; delivery statuses back into the timeline."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import httpx
import orjson
import pytest
import websockets
from aiosmtpd.controller import Controller
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from infra.broker import free_port
from tests.e2e.conftest import Stack, listed
from tests.support import serving

ACCOUNT, TWILIO_TOKEN, OUR_NUMBER = "AC" + "0" * 32, "twilio-test-token", "+15005550006"


class Sink:
    """The SMTP relay's stand-in: keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@dataclass
class TwilioApi:
    requests: list[dict[str, str]] = field(default_factory=list)

    async def create(self, request: Request) -> Response:
        form = await request.form()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        self.requests.append(fields)
        return JSONResponse({"sid": f"SM{len(self.requests):032x}", "status": "queued"}, 201)


@pytest.fixture
def relay() -> Iterator[tuple[Sink, int]]:
    sink, port = Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield sink, port
    controller.stop()


@pytest.fixture
async def twilio_api() -> AsyncIterator[tuple[TwilioApi, str]]:
    api = TwilioApi()
    route = Route("/2010-04-01/Accounts/{sid}/Messages.json", api.create, methods=["POST"])
    async with serving([route], free_port()) as url:
        yield api, url


@pytest.fixture
def stack_env(relay: tuple[Sink, int], twilio_api: tuple[TwilioApi, str]) -> dict[str, str]:
    return {
        "INBOX_SMTP_RELAY": f"127.0.0.1:{relay[1]}",
        "INBOX_EMAIL_DOMAINS": "example.com",
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_API_BASE": twilio_api[1],
        "TWILIO_SMS_FROM": OUR_NUMBER,
    }


def _send_mail(port: int, mail: EmailMessage) -> None:
    """A real SMTP session, in a thread: the server shares the test's event loop."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.send_message(mail)


async def _eventually(probe: Any, what: str) -> Any:
    for _ in range(600):
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _timeline(stack: Stack, conversation_id: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = (
        await stack.get(f"/api/v1/conversations/{conversation_id}")
    ).json()["timeline"]
    return entries


async def test_email_in_reply_out_through_the_relay_and_the_answer_threads_back(
    stack: Stack, relay: tuple[Sink, int]
) -> None:
    sink, _ = relay
    mail = EmailMessage()
    mail["From"] = "Carla Diaz <carla@customer.example.org>"
    mail["To"] = "support@example.com"
    mail["Subject"] = "Broken zipper"
    mail["Message-ID"] = "<first.1@customer.example.org>"
    mail.set_content("The zipper broke on day two.")
    await asyncio.to_thread(_send_mail, stack.settings.smtp_port, mail)

    (item,) = await listed(stack, 1)
    assert item["channels"] == ["email"]
    assert item["customer"]["identities"] == ["email:carla@customer.example.org"]
    reply = await stack.post(
        f"/api/v1/conversations/{item['id']}/replies", {"text": "Sorry! A new one is on its way."}
    )
    assert reply.status_code == 202

    async def relayed() -> bool:
        return bool(sink.messages)

    await _eventually(relayed, "the relay to receive the reply")
    _, recipients, raw = sink.messages[0]
    sent = BytesParser(policy=default_policy).parsebytes(raw)
    assert recipients == ["carla@customer.example.org"]
    assert sent["In-Reply-To"] == "<first.1@customer.example.org>"
    assert sent["Subject"].startswith("Re: Broken zipper [#")
    body = sent.get_body(("plain",))
    assert body is not None
    assert "A new one is on its way." in body.get_content()

    async def delivered() -> list[dict[str, Any]]:
        return [e for e in await _timeline(stack, item["id"]) if e["kind"] == "delivery"]

    (status,) = await _eventually(delivered, "the sent status in the timeline")
    assert status["data"]["status"] == "sent"

    # The customer answers our message (In-Reply-To our Message-ID): same conversation.
    answer = EmailMessage()
    answer["From"] = "carla@customer.example.org"
    answer["To"] = "support@example.com"
    answer["Subject"] = "Re: Broken zipper"
    answer["Message-ID"] = "<second.2@customer.example.org>"
    answer["In-Reply-To"] = sent["Message-ID"]
    answer.set_content("Thanks, received.")
    await asyncio.to_thread(_send_mail, stack.settings.smtp_port, answer)

    async def threaded() -> list[str]:
        texts = [e["text"] for e in await _timeline(stack, item["id"]) if e["kind"] == "message"]
        return texts if len(texts) == 3 else []

    texts = await _eventually(threaded, "the answer in the same conversation")
    assert texts[0].startswith("The zipper broke")
    assert texts[2].startswith("Thanks, received.")


async def test_sms_in_by_signed_webhook_reply_out_through_twilio_and_receipts_back(
    stack: Stack, twilio_api: tuple[TwilioApi, str]
) -> None:
    api, _ = twilio_api
    validator = RequestValidator(TWILIO_TOKEN)

    async def twilio_posts(path: str, form: dict[str, str]) -> httpx.Response:
        signature = validator.compute_signature(stack.settings.public_url + path, form)
        return await stack.client.post(
            path,
            content=urllib.parse.urlencode(form),
            headers={
                "X-Twilio-Signature": signature,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )

    inbound = {
        "MessageSid": "SM" + "1" * 32,
        "AccountSid": ACCOUNT,
        "From": "+14155550123",
        "To": OUR_NUMBER,
        "Body": "Where is my order?",
        "NumMedia": "0",
    }
    forged = await stack.client.post(
        "/twilio/messaging", data=inbound, headers={"X-Twilio-Signature": "bad"}
    )
    assert forged.status_code == 403
    assert (await twilio_posts("/twilio/messaging", inbound)).status_code == 200

    (item,) = await listed(stack, 1)
    assert item["customer"]["identities"] == ["phone:+14155550123"]
    reply = (
        await stack.post(f"/api/v1/conversations/{item['id']}/replies", {"text": "Tomorrow."})
    ).json()

    async def sent() -> bool:
        return bool(api.requests)

    await _eventually(sent, "Twilio's API to be called")
    (request,) = api.requests
    assert (request["To"], request["From"], request["Body"]) == (
        "+14155550123",
        OUR_NUMBER,
        "Tomorrow.",
    )
    assert request["StatusCallback"].endswith("/twilio/messaging/status")

    # Twilio's receipt names its own id; the timeline files it under our message.
    receipt = {
        "MessageSid": "SM" + f"{1:032x}",
        "AccountSid": ACCOUNT,
        "MessageStatus": "delivered",
        "From": OUR_NUMBER,
        "To": "+14155550123",
    }

    async def sent_recorded() -> bool:
        return any(e["kind"] == "delivery" for e in await _timeline(stack, item["id"]))

    await _eventually(sent_recorded, "the sent status")
    assert (await twilio_posts("/twilio/messaging/status", receipt)).status_code == 200

    async def delivered() -> list[dict[str, Any]]:
        entries = [e for e in await _timeline(stack, item["id"]) if e["kind"] == "delivery"]
        return entries if len(entries) == 2 else []

    statuses = await _eventually(delivered, "the delivered receipt")
    assert [(e["data"]["status"], e["data"]["message_id"]) for e in statuses] == [
        ("sent", reply["message_id"]),
        ("delivered", reply["message_id"]),
    ]


async def test_chat_in_over_a_websocket_and_the_reply_pushed_back(stack: Stack) -> None:
    url = f"ws://{stack.settings.http_host}:{stack.settings.http_port}/chat/ws?visitor=v-42"
    async with websockets.connect(url) as socket:
        welcome = orjson.loads(await socket.recv())
        assert welcome["type"] == "welcome"
        assert welcome["token"]
        await socket.send(
            orjson.dumps(
                {"type": "message", "text": "Is the red one in stock?", "id": "c1"}
            ).decode()
        )
        ack = orjson.loads(await socket.recv())
        assert ack == {"type": "ack", "id": "c1"} or (ack["type"], ack["id"]) == ("ack", "c1")

        (item,) = await listed(stack, 1)
        assert item["customer"]["identities"] == ["visitor:v-42"]
        assert (
            await stack.post(
                f"/api/v1/conversations/{item['id']}/replies", {"text": "Yes, size M."}
            )
        ).status_code == 202
        pushed = orjson.loads(await asyncio.wait_for(socket.recv(), 30))
        assert (pushed["type"], pushed["from"], pushed["text"]) == (
            "message",
            "agent",
            "Yes, size M.",
        )
