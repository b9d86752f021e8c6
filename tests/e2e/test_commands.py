"""Agent commands and customer merges through the HTTP API, with the worker running."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from tests.e2e.conftest import Stack, listed
from tests.support import contact_event, produce


async def _send(stack: Stack, *events: dict[str, Any]) -> None:
    assert stack.settings.kafka_bootstrap is not None
    await produce(stack.settings.kafka_bootstrap, stack.settings.contact_events_topic, list(events))


# What routing records on its own (the stack runs it, as `inbox dev` does): these tests
# are about agents' commands, so they look at the timeline without it.
_ROUTING = frozenset({"Queued", "Offered", "OfferLapsed", "SlaWarned", "SlaBreached"})


async def _timeline(stack: Stack, conversation_id: str, count: int) -> dict[str, Any]:
    for _ in range(600):
        detail: dict[str, Any] = (
            await stack.get(f"/api/v1/conversations/{conversation_id}")
        ).json()
        detail["timeline"] = [e for e in detail["timeline"] if e["event"] not in _ROUTING]
        if len(detail["timeline"]) >= count:
            return detail
        await asyncio.sleep(0.05)
    raise AssertionError(f"the timeline never reached {count} entries")


async def test_conversation_commands_and_state_conflicts(stack: Stack) -> None:
    await _send(stack, contact_event("c1", customer={"phone": "+14155550100"}))
    (item,) = await listed(stack, 1)
    cid = item["id"]

    reply = await stack.post(f"/api/v1/conversations/{cid}/replies", {"text": "On its way"})
    assert reply.status_code == 202
    assert reply.json()["message_id"]
    assert (
        await stack.post(f"/api/v1/conversations/{cid}/notes", {"text": "VIP"})
    ).status_code == 201
    # an agent nobody registered, and a queue name no queue could have, change nothing
    ghost = await stack.post(f"/api/v1/conversations/{cid}/assign", {"agent": "ann"})
    assert ghost.status_code == 422
    assert "no agent 'ann'" in ghost.json()["error"]["message"]
    bad_queue = await stack.post(f"/api/v1/conversations/{cid}/transfer", {"queue": "sales\n"})
    assert bad_queue.status_code == 422
    assert "printable" in bad_queue.json()["error"]["message"]
    ann = {"id": "ann", "name": "Ann", "role": "agent"}
    assert (await stack.post("/api/v1/agents", ann)).status_code == 201
    assert (
        await stack.post(f"/api/v1/conversations/{cid}/assign", {"agent": "ann"})
    ).status_code == 200
    assert (await stack.post(f"/api/v1/conversations/{cid}/resolve")).json()["status"] == "resolved"
    again = await stack.post(f"/api/v1/conversations/{cid}/resolve")
    assert again.status_code == 409
    assert again.json()["error"]["message"] == "already resolved"
    assert (
        await stack.post(f"/api/v1/conversations/{cid}/escalate", {"reason": "x"})
    ).status_code == 409

    # Bad input changes nothing.
    assert (await stack.post(f"/api/v1/conversations/{cid}/notes", {})).status_code == 422
    bad_json = await stack.client.post(f"/api/v1/conversations/{cid}/notes", content=b"{oops")
    assert bad_json.status_code == 400
    assert (
        await stack.post(f"/api/v1/conversations/{cid}/replies", {"text": "x", "channel": "fax"})
    ).status_code == 422
    unknown = "0b0c7a52-3b0e-4c8e-9a55-0c4f6f7d2b10"
    assert (await stack.post(f"/api/v1/conversations/{unknown}/resolve")).status_code == 404

    detail = await _timeline(stack, cid, 7)
    kinds = [(e["kind"], e.get("direction"), e["event"]) for e in detail["timeline"]]
    assert kinds == [
        ("status", None, "Opened"),
        ("message", "in", "MessageReceived"),
        ("message", "out", "ReplyQueued"),
        ("note", None, "NoteAdded"),
        ("status", None, "Assigned"),
        ("status", None, "Resolved"),
        ("csat", "out", "SurveyQueued"),  # the satisfaction survey, by SMS
    ]
    history = (await stack.get(f"/api/v1/conversations/{cid}/events")).json()["items"]
    history = [e for e in history if e["type"] not in _ROUTING]
    assert [e["actor"] for e in history][2:] == ["admin"] * 5

    # The customer writes again: the conversation reopens.
    await _send(stack, contact_event("c2", customer={"phone": "+14155550100"}, seconds=60))
    detail = await _timeline(stack, cid, 9)
    assert detail["status"] == "open"
    assert [e["event"] for e in detail["timeline"][-2:]] == ["Reopened", "MessageReceived"]


async def test_merge_and_unmerge_customers_while_the_worker_runs(stack: Stack) -> None:
    await _send(
        stack,
        contact_event(
            "m-email",
            channel="email",
            customer={"email": "dana@example.org"},
            payload={"text": "hi", "subject": "Hello"},
        ),
        contact_event("m-sms", customer={"phone": "+14155550111"}, seconds=1),
    )
    items = await listed(stack, 2)
    by_channel = {i["channels"][0]: i for i in items}
    dana, phone = by_channel["email"]["customer"]["id"], by_channel["sms"]["customer"]["id"]

    merged = await stack.post(f"/api/v1/customers/{dana}/merge", {"other": phone})
    assert merged.status_code == 200
    assert sorted(merged.json()["identities"]) == ["email:dana@example.org", "phone:+14155550111"]
    assert (
        await stack.post(f"/api/v1/customers/{dana}/merge", {"other": phone})
    ).status_code == 409
    assert (await stack.post(f"/api/v1/customers/{dana}/merge", {"other": dana})).status_code == 409

    # The running worker now routes the phone to the survivor's conversation.
    await _send(stack, contact_event("m-sms-2", customer={"phone": "+14155550111"}, seconds=2))
    email_conv = by_channel["email"]["id"]
    detail = await _timeline(stack, email_conv, 3)
    assert [e["source_event_id"] for e in detail["timeline"] if e["kind"] == "message"] == [
        "m-email",
        "m-sms-2",
    ]

    bad = await stack.post(f"/api/v1/customers/{dana}/unmerge", {"identity": "phone:+14155550199"})
    assert bad.status_code == 409
    restored = await stack.post(
        f"/api/v1/customers/{dana}/unmerge", {"identity": "phone:+14155550111"}
    )
    assert restored.status_code == 200
    assert restored.json() == {"id": phone, "identities": ["phone:+14155550111"]}

    # After the undo the phone's contacts go to its own customer again.
    await _send(stack, contact_event("m-sms-3", customer={"phone": "+14155550111"}, seconds=3))
    phone_conv = by_channel["sms"]["id"]
    detail = await _timeline(stack, phone_conv, 3)
    assert [e["source_event_id"] for e in detail["timeline"] if e["kind"] == "message"][
        -1
    ] == "m-sms-3"
    by_key = (await stack.get("/api/v1/conversations", customer="phone:+14155550111")).json()
    assert [i["id"] for i in by_key["items"]] == [phone_conv]


async def test_a_conversation_as_it_was_at_an_earlier_time(stack: Stack) -> None:
    await _send(stack, contact_event("h1", customer={"phone": "+14155550177"}))
    (item,) = await listed(stack, 1)
    cid = item["id"]
    before = datetime.now(UTC)
    await asyncio.sleep(0.01)  # so the instant separates what came before from the note
    assert (
        await stack.post(f"/api/v1/conversations/{cid}/notes", {"text": "n"})
    ).status_code == 201
    assert (await stack.post(f"/api/v1/conversations/{cid}/resolve")).status_code == 200

    then = (await stack.get(f"/api/v1/conversations/{cid}", as_of=before.isoformat())).json()
    assert then["status"] == "open"
    events = [e["event"] for e in then["timeline"]]
    assert events[:2] == ["Opened", "MessageReceived"]
    assert "NoteAdded" not in events
    assert "Resolved" not in events

    now = (
        await stack.get(f"/api/v1/conversations/{cid}", as_of=datetime.now(UTC).isoformat())
    ).json()
    assert now["status"] == "resolved"
    assert "NoteAdded" in [e["event"] for e in now["timeline"]]

    too_early = await stack.get(f"/api/v1/conversations/{cid}", as_of="2000-01-01T00:00:00Z")
    assert too_early.status_code == 404
    bad = await stack.get(f"/api/v1/conversations/{cid}", as_of="yesterday")
    assert bad.status_code == 422
