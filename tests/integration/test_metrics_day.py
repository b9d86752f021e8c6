"""A scripted day of contact-center traffic, with every KPI worked out by hand.

The day is built with the real aggregates (conversations, agents, queues, callbacks) saved in
a real event store (SQLite and PostgreSQL); the real runner feeds the metrics projection.
Monday 2026-03-02, all times UTC. Queue `billing` has an SLA calendar (Mon-Fri 09:00-17:00
UTC); `support` has none (24/7: business time = elapsed time).

Agents: sue (registered 08:00, available 08:45, away 10:30, offline 11:00) and tom
(registered 08:00, available 09:00, offline 12:30).

    E1  email, billing  07:00 message (queued 07:00:01); 09:30 assigned tom; 09:35 escalated;
                        09:40 tom replies; 10:00 resolved; 11:00 writes again (reopen);
                        11:30 tom replies; 12:00 resolved; 12:10 CSAT 2
    C1  voice, support  08:50 call starts; 08:51 queued; 08:51:15 answered by sue (waited
                        15 s), assigned sue; 08:56:15 ends (talk 240, hold 60, wrap 30);
                        08:57 resolved; 09:05 CSAT 5
    C2  voice, support  09:10 call starts; 09:10:20 queued; 09:11 abandoned (and ends)
    C3  voice, support  09:20 call starts; 09:20:10 queued; 09:21:10 asks for a callback;
                        09:21:15 hangs up (no abandon: the callback was asked first)
    C4  voice           09:30 call starts; 09:30:40 hangs up in the IVR (never queued)
    H1  chat, support   10:00 chat starts (queued); 10:00:05 message in the chat; 10:01:05
                        assigned sue; 10:01:35 sue replies; 10:05 chat ends; 10:06 resolved;
                        10:10 CSAT 4
    E2  email, support  11:15 message (queued); 11:20 escalated
    callback for C3: requested 09:21:10, dialled by sue 09:40, completed 09:41:10 (20 min)
    callback for C2: requested 09:15 (from the web), one attempt fails, given up 10:15
"""

from __future__ import annotations

import csv
import io
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from inbox.domain.agent import Agent
from inbox.domain.callback import Callback
from inbox.domain.conversation import Conversation
from inbox.domain.queue import Queue
from inbox.domain.time import iso
from inbox.report import report
from infra.store import EventStore
from projections.db import ReadModelDB
from projections.metrics import Metrics
from projections.metrics_query import metrics
from projections.runner import ProjectionRunner

DAY = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
BILLING_SLA = {
    "timezone": "UTC",
    "hours": {d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
    "targets": {"0": {"first_response": "1h"}},
}


def at(h: int, m: int = 0, s: int = 0) -> str:
    return iso(DAY.replace(hour=h, minute=m, second=s))


def t(h: int, m: int = 0, s: int = 0) -> datetime:
    return DAY.replace(hour=h, minute=m, second=s)


@dataclass
class Day:
    store: EventStore
    db: ReadModelDB
    n: int = 0
    convs: dict[str, Conversation] = field(default_factory=dict)

    def save(self, *aggregates: Any) -> None:
        self.store.save(*aggregates)

    def agent(self, agent_id: str, when: str) -> Agent:
        agent = Agent.register(
            agent_id=agent_id,
            name=agent_id.title(),
            role="agent",
            skills=[],
            languages=[],
            capacity={"voice": 1, "chat": 3, "email": 5},
            voice_to=None,
            token_hash="x",
            actor="admin",
            at=when,
        )
        self.save(agent)
        return agent

    def presence(self, agent: Agent, status: str, when: str) -> None:
        agent.set_presence(status, reason="test", actor="test", at=when)
        self.save(agent)

    def open(self, name: str, channel: str, when: str) -> Conversation:
        conv = Conversation(
            customer_id=f"customer-{name}",
            channel=channel,
            queue=None,
            previous=None,
            source_event_id=f"open-{name}",
            at=when,
        )
        self.convs[name] = conv
        return conv

    def message(self, conv: Conversation, channel: str, when: str) -> None:
        self.n += 1
        conv.receive_message(
            automatic=False,
            at=when,
            channel=channel,
            via=None,
            message_id=f"m{self.n}",
            text=f"message {self.n}",
            subject=None,
            html=None,
            attachments=[],
            thread_ref=None,
            in_reply_to=[],
            source_event_id=f"msg-{self.n}",
        )

    def activity(self, conv: Conversation, activity: str, when: str, **data: Any) -> None:
        self.n += 1
        channel = "chat" if activity.startswith("chat.") else "voice"
        conv.record_activity(
            activity, at=when, channel=channel, data=data, source_event_id=f"act-{self.n}"
        )

    def csat(self, conv: Conversation, score: int, when: str) -> None:
        self.n += 1
        conv.record_csat(
            channel="sms", score=score, comment=None, source_event_id=f"csat-{self.n}", at=when
        )

    def reply(self, conv: Conversation, agent: str, when: str) -> None:
        self.n += 1
        conv.queue_reply(f"r{self.n}", conv.channel, "on it", actor=agent, at=when)


def script(day: Day) -> None:
    day.save(
        Queue(name="support", spec={"name": "support"}, actor="admin", at=at(6)),
        Queue(
            name="billing", spec={"name": "billing", "sla": BILLING_SLA}, actor="admin", at=at(6)
        ),
    )
    sue, tom = day.agent("sue", at(8)), day.agent("tom", at(8))

    e1 = day.open("E1", "email", at(7))
    day.message(e1, "email", at(7))
    e1.enter_queue("billing", 0, reason="rule", actor="router", at=at(7, 0, 1))
    day.save(e1)

    day.presence(sue, "available", at(8, 45))
    c1 = day.open("C1", "voice", at(8, 50))
    day.activity(c1, "call.started", at(8, 50), call_sid="CA1")
    day.activity(c1, "ivr.selected", at(8, 50, 30), call_sid="CA1", choice="1")
    day.activity(c1, "call.queued", at(8, 51), call_sid="CA1", queue="support")
    c1.enter_queue("support", 0, reason="ivr", actor="router", at=at(8, 51))
    day.activity(
        c1, "call.answered", at(8, 51, 15), call_sid="CA1", queue="support", agent="sue",
        queue_seconds=15,
    )  # fmt: skip
    c1.assign("sue", actor="router", at=at(8, 51, 15))
    day.activity(
        c1, "call.ended", at(8, 56, 15), call_sid="CA1", talk_seconds=240, hold_seconds=60,
        wrap_seconds=30,
    )  # fmt: skip
    c1.resolve(actor="sue", at=at(8, 57))
    day.save(c1)

    day.presence(tom, "available", at(9))
    day.csat(c1, 5, at(9, 5))
    day.save(c1)

    c2 = day.open("C2", "voice", at(9, 10))
    day.activity(c2, "call.started", at(9, 10), call_sid="CA2")
    day.activity(c2, "call.queued", at(9, 10, 20), call_sid="CA2", queue="support")
    c2.enter_queue("support", 0, reason="ivr", actor="router", at=at(9, 10, 20))
    day.activity(c2, "call.abandoned", at(9, 11), call_sid="CA2", queue="support", queue_seconds=40)
    day.activity(c2, "call.ended", at(9, 11), call_sid="CA2", talk_seconds=0)
    day.save(c2)
    web = Callback.request(
        source_event_id="web-cb-1",
        conversation_id=str(c2.id),
        call_sid=None,
        number="+14155550102",
        queue="support",
        requested_at=at(9, 15),
        at=at(9, 15),
    )
    day.save(web)

    c3 = day.open("C3", "voice", at(9, 20))
    day.activity(c3, "call.started", at(9, 20), call_sid="CA3")
    day.activity(c3, "call.queued", at(9, 20, 10), call_sid="CA3", queue="support")
    c3.enter_queue("support", 0, reason="ivr", actor="router", at=at(9, 20, 10))
    day.activity(
        c3, "callback.requested", at(9, 21, 10), call_sid="CA3", queue="support",
        number="+14155550103",
    )  # fmt: skip
    day.activity(c3, "call.abandoned", at(9, 21, 15), call_sid="CA3", queue="support")
    day.save(c3)
    callback = Callback.request(
        source_event_id="act-cb-3",
        conversation_id=str(c3.id),
        call_sid="CA3",
        number="+14155550103",
        queue="support",
        requested_at=at(9, 21, 10),
        at=at(9, 21, 11),
    )
    day.save(callback)

    c4 = day.open("C4", "voice", at(9, 30))
    day.activity(c4, "call.started", at(9, 30), call_sid="CA4")
    day.activity(c4, "call.ended", at(9, 30, 40), call_sid="CA4", ended_in="ivr", talk_seconds=0)
    day.save(c4)

    e1.assign("tom", actor="router", at=at(9, 30))
    e1.escalate("angry", actor="tom", at=at(9, 35))
    day.reply(e1, "tom", at(9, 40))
    day.save(e1)

    callback.start_dialing("sue", max_attempts=3, at=at(9, 40))
    callback.dialed(1, "CB3", at=at(9, 40, 5))
    callback.complete(1, "CB3", at=at(9, 41, 10))
    day.save(callback)
    web.start_dialing("sue", max_attempts=1, at=at(9, 50))
    web.attempt_failed(1, "no-answer", retry_at=None, at=at(9, 51))
    day.save(web)

    e1.resolve(actor="tom", at=at(10))
    day.save(e1)
    h1 = day.open("H1", "chat", at(10))
    day.activity(h1, "chat.started", at(10))
    h1.enter_queue("support", 0, reason="entry", actor="router", at=at(10))
    day.message(h1, "chat", at(10, 0, 5))
    h1.assign("sue", actor="router", at=at(10, 1, 5))
    day.reply(h1, "sue", at(10, 1, 35))
    day.activity(h1, "chat.ended", at(10, 5))
    h1.resolve(actor="sue", at=at(10, 6))
    day.csat(h1, 4, at(10, 10))
    day.save(h1)
    web.give_up("no answer", at=at(10, 15))
    day.save(web)
    day.presence(sue, "away", at(10, 30))

    day.presence(sue, "offline", at(11))
    day.message(e1, "email", at(11))  # reopens E1 (within 7 days of its resolution)
    e2 = day.open("E2", "email", at(11, 15))
    day.message(e2, "email", at(11, 15))
    e2.enter_queue("support", 0, reason="rule", actor="router", at=at(11, 15))
    e2.escalate("legal", actor="sue", at=at(11, 20))
    day.save(e2)
    day.reply(e1, "tom", at(11, 30))
    e1.resolve(actor="tom", at=at(12))
    day.csat(e1, 2, at(12, 10))
    day.save(e1)
    day.presence(tom, "offline", at(12, 30))


@pytest.fixture
def day(store: EventStore, db: ReadModelDB) -> Day:
    d = Day(store, db)
    script(d)
    ProjectionRunner(store, db, [Metrics()]).run_until_caught_up()
    return d


NO_CALLBACKS = {
    "requested": 0,
    "completed": 0,
    "failed": 0,
    "mean_time_to_callback": None,
    "mean_time_to_callback_business": None,
}


def expect(
    *, volume: dict[str, int] | None = None, callbacks: dict[str, Any] | None = None, **kpis: Any
) -> dict[str, Any]:
    """A bucket's KPIs: the given values, null for the rest, volume 0 where not given."""
    channels = ("email", "voice", "sms", "whatsapp", "messenger", "instagram", "chat")
    keys = (
        "first_response_time",
        "first_response_time_business",
        "resolution_time",
        "resolution_time_business",
        "resolved_within_24h",
        "asa",
        "abandonment_rate",
        "service_level",
        "aht",
        "fcr",
        "csat",
        "escalation_rate",
        "agent_utilization",
    )
    result: dict[str, Any] = {key: kpis.get(key) for key in keys}
    result["volume"] = {c: (volume or {}).get(c, 0) for c in channels}
    result["callbacks"] = {**NO_CALLBACKS, **(callbacks or {})}
    return result


def flat(kpis: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in kpis.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def check(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert flat(actual) == pytest.approx(flat(expected))


def test_every_kpi_by_hour(day: Day) -> None:
    result = metrics(day.db, start=t(7), end=t(13), bucket="hour")
    starts = [b["start"] for b in result["buckets"]]
    assert starts == [f"2026-03-02T{h:02d}:00:00+00:00" for h in range(7, 13)]
    assert result["buckets"][-1]["end"] == "2026-03-02T13:00:00+00:00"
    kpis = [b["kpis"] for b in result["buckets"]]

    # 07:00: E1's message; E1 opened here (under billing, its first queue) and was escalated.
    check(kpis[0], expect(volume={"email": 1}, escalation_rate=1.0))
    # 08:00: C1. First response = answer 08:51:15 - call 08:50 = 75 s; its wait 15 s is
    # within 20 s; 1 call queued, 0 abandoned; AHT 240 + 60 + 30 = 330 s; resolved in
    # 08:57 - 08:50 = 420 s with one contact. Sue staffed 08:45-09:00 = 900 s, busy
    # 08:51:15 (answer, assignment) - 08:57 (resolved) = 345 s.
    check(
        kpis[1],
        expect(
            volume={"voice": 1},
            first_response_time=75.0,
            first_response_time_business=75.0,
            resolution_time=420.0,
            resolution_time_business=420.0,
            resolved_within_24h=1.0,
            asa=15.0,
            abandonment_rate=0.0,
            service_level=1.0,
            aht=330.0,
            fcr=1.0,
            escalation_rate=0.0,
            agent_utilization=345 / 900,
        ),
    )
    # 09:00: C2, C3, C4 called (C4 hung up in the IVR: volume, but no queue outcome). Queue
    # outcomes: C2 abandoned, C3 asked for a callback (its later hang-up is no abandon):
    # abandonment 1/2, none answered within 20 s: 0/2. E1's first response: 09:40 - 07:00 =
    # 9,600 s; in billing's hours 09:00-09:40 = 2,400 s. C1's CSAT 5. Callbacks: C2's (web,
    # 09:15) and C3's (09:21:10) requested; C3's completed 09:41:10, 1,200 s after.
    # Sue staffed 3,600 s, idle; tom staffed 3,600 s, busy with E1 09:30-10:00 = 1,800 s.
    check(
        kpis[2],
        expect(
            volume={"voice": 3},
            first_response_time=9600.0,
            first_response_time_business=2400.0,
            abandonment_rate=0.5,
            service_level=0.0,
            csat=1.0,
            escalation_rate=0.0,
            callbacks={
                "requested": 2,
                "completed": 1,
                "mean_time_to_callback": 1200.0,
                "mean_time_to_callback_business": 1200.0,
            },
            agent_utilization=1800 / 7200,
        ),
    )
    # 10:00: H1's chat (its message inside the chat is the same contact). H1 first response
    # 10:01:35 - 10:00 = 95 s. Resolutions: E1 at 10:00 after 3 h = 10,800 s (business
    # 09:00-10:00 = 3,600 s), reopened at 11:00 so not first-contact; H1 after 360 s with one
    # contact: mean (10,800 + 360) / 2 = 5,580 s, business (3,600 + 360) / 2 = 1,980 s,
    # FCR 1/2. H1's CSAT 4. The web callback failed at 10:15. Sue staffed 10:00-10:30 =
    # 1,800 s, busy with H1 10:01:05-10:06 = 295 s; tom staffed 3,600 s, idle.
    check(
        kpis[3],
        expect(
            volume={"chat": 1},
            first_response_time=95.0,
            first_response_time_business=95.0,
            resolution_time=5580.0,
            resolution_time_business=1980.0,
            resolved_within_24h=1.0,
            fcr=0.5,
            csat=1.0,
            escalation_rate=0.0,
            callbacks={"failed": 1},
            agent_utilization=295 / 5400,
        ),
    )
    # 11:00: E1 writes again (reopen) and E2 writes; E2 opened and escalated. E1's first
    # response after the reopen: 11:30 - 11:00 = 1,800 s. Tom busy the whole hour (E1 open).
    check(
        kpis[4],
        expect(
            volume={"email": 2},
            first_response_time=1800.0,
            first_response_time_business=1800.0,
            escalation_rate=1.0,
            agent_utilization=1.0,
        ),
    )
    # 12:00: E1 resolved 1 h after its reopen (a new measurement of resolution time, but not
    # a newly resolved conversation: FCR counted it at 10:00); its CSAT 2. Tom staffed until
    # 12:30, idle.
    check(
        kpis[5],
        expect(
            resolution_time=3600.0,
            resolution_time_business=3600.0,
            resolved_within_24h=1.0,
            csat=0.0,
            agent_utilization=0.0,
        ),
    )

    # The day: first responses 75, 9,600, 95, 1,800 (business 75, 2,400, 95, 1,800);
    # resolutions 420, 10,800, 360, 3,600 (business 420, 3,600, 360, 3,600) of three
    # conversations, two of them first-contact; 7 opened, 2 escalated; queue outcomes:
    # answered (15 s), abandoned, callback; CSAT 5, 4, 2; agents busy 345 + 295 + 1,800 +
    # 3,600 = 6,040 s of 6,300 (sue 08:45-10:30) + 12,600 (tom 09:00-12:30) staffed.
    check(
        result["total"],
        expect(
            volume={"email": 3, "voice": 4, "chat": 1},
            first_response_time=11570 / 4,
            first_response_time_business=4370 / 4,
            resolution_time=15180 / 4,
            resolution_time_business=7980 / 4,
            resolved_within_24h=1.0,
            asa=15.0,
            abandonment_rate=1 / 3,
            service_level=1 / 3,
            aht=330.0,
            fcr=2 / 3,
            csat=2 / 3,
            escalation_rate=2 / 7,
            callbacks={
                "requested": 2,
                "completed": 1,
                "failed": 1,
                "mean_time_to_callback": 1200.0,
                "mean_time_to_callback_business": 1200.0,
            },
            agent_utilization=6040 / 18900,
        ),
    )


def test_one_day_bucket_is_the_total(day: Day) -> None:
    result = metrics(day.db, start=t(7), end=t(13), bucket="day")
    assert [(b["start"], b["end"]) for b in result["buckets"]] == [
        ("2026-03-02T00:00:00+00:00", "2026-03-03T00:00:00+00:00")
    ]
    assert result["buckets"][0]["kpis"] == result["total"]


def test_by_channel_queue_and_agent(day: Day) -> None:
    def total(**filters: Any) -> dict[str, Any]:
        result: dict[str, Any] = metrics(
            day.db, start=t(0), end=t(23, 59), bucket="day", **filters
        )["total"]
        return result

    # Voice: C1-C4 (4 opened, none escalated); the call KPIs; both callbacks.
    check(
        total(channel="voice"),
        expect(
            volume={"voice": 4},
            first_response_time=75.0,
            first_response_time_business=75.0,
            resolution_time=420.0,
            resolution_time_business=420.0,
            resolved_within_24h=1.0,
            asa=15.0,
            abandonment_rate=1 / 3,
            service_level=1 / 3,
            aht=330.0,
            fcr=1.0,
            csat=1.0,
            escalation_rate=0.0,
            callbacks={
                "requested": 2,
                "completed": 1,
                "failed": 1,
                "mean_time_to_callback": 1200.0,
                "mean_time_to_callback_business": 1200.0,
            },
        ),
    )
    # Billing: only E1 (its first message came a second before it was queued: contacts
    # before a conversation's first queue count under it). First responses 9,600 and 1,800
    # (business 2,400 and 1,800).
    check(
        total(queue="billing"),
        expect(
            volume={"email": 2},
            first_response_time=5700.0,
            first_response_time_business=2100.0,
            resolution_time=7200.0,
            resolution_time_business=3600.0,
            resolved_within_24h=1.0,
            fcr=0.0,
            csat=0.0,
            escalation_rate=1.0,
        ),
    )
    # Sue: answered C1 (first response 75 s) and H1 (95 s), resolved both first time; the
    # call she took; CSAT 5 and 4; the callback she completed. Opened conversations have no
    # agent, so no escalation rate by agent.
    check(
        total(agent="sue"),
        expect(
            first_response_time=85.0,
            first_response_time_business=85.0,
            resolution_time=390.0,
            resolution_time_business=390.0,
            resolved_within_24h=1.0,
            asa=15.0,
            abandonment_rate=0.0,
            service_level=1.0,
            aht=330.0,
            fcr=1.0,
            csat=1.0,
            callbacks={
                "completed": 1,
                "mean_time_to_callback": 1200.0,
                "mean_time_to_callback_business": 1200.0,
            },
            agent_utilization=640 / 6300,
        ),
    )
    # Tom: E1 throughout; its reopening message arrived while assigned to him.
    check(
        total(agent="tom"),
        expect(
            volume={"email": 1},
            first_response_time=5700.0,
            first_response_time_business=2100.0,
            resolution_time=7200.0,
            resolution_time_business=3600.0,
            resolved_within_24h=1.0,
            fcr=0.0,
            csat=0.0,
            agent_utilization=5400 / 12600,
        ),
    )
    # Channel and queue together: support voice is C1-C3 (C4 never entered a queue).
    both = total(channel="voice", queue="support")
    assert (both["volume"]["voice"], both["escalation_rate"]) == (3, 0.0)
    # Utilization belongs to no channel.
    assert total(channel="email")["agent_utilization"] is None


def test_service_level_threshold_is_a_query_parameter(day: Day) -> None:
    def level(seconds: float) -> Any:
        return metrics(day.db, start=t(7), end=t(13), bucket="day", service_level_seconds=seconds)[
            "total"
        ]["service_level"]

    # C1 waited 15 s: within 15 and 20 s, not within 10 s; 3 calls had a queue outcome.
    assert (level(10), level(15), level(20)) == (0.0, pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_report_in_every_format(day: Day, tmp_path: Path) -> None:
    query: dict[str, Any] = {"start": t(7), "end": t(13), "bucket": "hour"}
    shown = report(day.db, fmt="json", out=tmp_path / "day.json", **query)
    assert orjson.loads((tmp_path / "day.json").read_bytes()) == shown == metrics(day.db, **query)

    report(day.db, fmt="csv", out=tmp_path / "day.csv", **query)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "day.csv").read_text())))
    assert [r["start"][11:16] for r in rows] == [
        "07:00",
        "08:00",
        "09:00",
        "10:00",
        "11:00",
        "12:00",
    ]
    assert (rows[1]["aht"], rows[1]["volume_voice"], rows[0]["aht"]) == ("330.0", "1", "")
    assert rows[2]["callbacks_requested"] == "2"

    text = io.StringIO()
    report(day.db, fmt="table", out=text, **query)
    assert "total" in text.getvalue()
    assert "2 requested, 1 completed, 1 failed" in text.getvalue()

    png = io.BytesIO()
    report(day.db, fmt="png", out=png, **query)
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png.getvalue()[16:24])
    assert (width, height) == (1920, 1080)
