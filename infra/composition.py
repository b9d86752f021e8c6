"""The composition root: builds every part from the settings and runs them. Called by the CLI
only, never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from adapters.chat import ChatGateway, ChatSender, ReadModelChatHistory
from adapters.email_in import SmtpServer, smtp_server
from adapters.email_out import SmtpSender
from adapters.kafka import KafkaPublisher
from adapters.meta import meta_routes
from adapters.meta_out import GRAPH_URL, MetaSender
from adapters.outbound import ChannelSender
from adapters.senders import WhatsAppRouter
from adapters.twilio_messaging import twilio_messaging_routes
from adapters.twilio_out import TwilioSender
from inbox.access import Principal
from inbox.agents import Directory
from inbox.api import ApiContext, create_app
from inbox.commands import Commands, SurveyText
from inbox.delivery import DeliveryService
from inbox.distribution import Distributor
from inbox.stream import ConversationScope, StreamHub
from inbox.surveys import Surveys
from inbox.worker import IngestWorker, WorkerConfig
from infra.broker import EmbeddedBroker
from infra.kafka import app_topics, ensure_topics
from infra.settings import Settings, chat_secret
from infra.store import EventStore, open_event_store
from ivr.connector import CallConnector
from ivr.dialer import CallbackDialer, directory_voice_to, queue_hours
from ivr.flow import QueueInfo
from ivr.menu import Menu, load_bundled_example, load_menu
from ivr.twilio_rest import TwilioRestCalls
from ivr.voice import voice_routes
from projections.db import DatabaseError, ReadModelDB, open_read_models
from projections.directory import list_queues
from projections.inbox_view import get_item
from projections.process_state import ReadModelProcessStates
from projections.replay import PROJECTIONS
from projections.runner import Lead, ProjectionRunner
from projections.tracking import ensure_state_table

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root stops every part."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Parts:
    settings: Settings
    store: EventStore
    read_models: ReadModelDB

    def close(self) -> None:
        self.read_models.close()
        self.store.close()


def build_parts(settings: Settings) -> Parts:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    read_models = open_read_models(settings)
    # Queries answer "nothing yet" rather than fail before the projections' first round.
    ensure_state_table(read_models)
    return Parts(settings, open_event_store(settings), read_models)


@dataclass
class Channels:
    """The channel adapters of one HTTP process and the senders that share their state (a
    chat reply reaches the sockets of this process)."""

    publisher: KafkaPublisher
    routes: list[BaseRoute]
    senders: dict[str, ChannelSender]
    hold_reasons: dict[str, str]
    closers: list[Callable[[], Awaitable[None]]]
    surveys: Surveys


def build_publisher(settings: Settings) -> KafkaPublisher:
    assert settings.kafka_bootstrap is not None
    return KafkaPublisher(
        settings.kafka_bootstrap,
        idempotence=settings.kafka_idempotence,
        topic=settings.contact_events_topic,
    )


def load_ivr_menu(settings: Settings) -> Menu:
    """The IVR menu (INBOX_IVR_CONFIG, else the bundled example); InvalidMenu names every
    problem with its place."""
    return load_menu(settings.ivr_config) if settings.ivr_config else load_bundled_example()


def queue_info_from(queues: Distributor | None) -> Callable[[str, str], Awaitable[QueueInfo]]:
    async def queue_info(call_sid: str, queue: str) -> QueueInfo:
        if queues is None:
            return QueueInfo(position=None, estimate_seconds=None, agents_available=0)
        position, estimate, free = queues.queue_info(call_sid, queue)
        return QueueInfo(position=position, estimate_seconds=estimate, agents_available=free)

    return queue_info


def build_channels(
    parts: Parts, *, menu: Menu | None = None, queues: Distributor | None = None
) -> Channels:
    settings = parts.settings
    publisher = build_publisher(settings)
    chat = ChatGateway(publisher, chat_secret(settings), ReadModelChatHistory(parts.read_models))
    surveys = Surveys(
        public_url=settings.public_url,
        # survey tokens are signed under their own prefix: sharing the secret is safe
        secret=chat_secret(settings),
        publisher=publisher,
        customer_email=lambda conversation: asyncio.to_thread(
            customer_email, parts.read_models, conversation
        ),
    )
    routes: list[BaseRoute] = [
        *meta_routes(
            publisher, app_secret=settings.meta_app_secret, verify_token=settings.meta_verify_token
        ),
        *twilio_messaging_routes(
            publisher, auth_token=settings.twilio_auth_token, public_url=settings.public_url
        ),
        *chat.routes(),
        *surveys.routes(),
        *voice_routes(
            publisher,
            menu=menu or load_ivr_menu(settings),
            auth_token=settings.twilio_auth_token,
            public_url=settings.public_url,
            queue_info=queue_info_from(queues),
        ),
    ]
    senders: dict[str, ChannelSender] = {"chat": ChatSender(chat.hub)}
    hold_reasons: dict[str, str] = {}
    closers: list[Callable[[], Awaitable[None]]] = [publisher.close]
    domain = settings.email_domains[0]
    if settings.smtp_relay:
        host, _, port = settings.smtp_relay.rpartition(":")
        senders["email"] = SmtpSender(
            host or "127.0.0.1",
            int(port or 25),
            from_address=settings.smtp_from or f"support@{domain}",
            domain=domain,
            username=settings.smtp_relay_user,
            password=settings.smtp_relay_password,
        )
    else:
        hold_reasons["email"] = "INBOX_SMTP_RELAY is not set: email replies are kept undelivered"
    twilio: TwilioSender | None = None
    if settings.twilio_account_sid and settings.twilio_auth_token:
        twilio = TwilioSender(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            public_url=settings.public_url,
            api_base=settings.twilio_api_base,
            sms_from=settings.twilio_sms_from,
            whatsapp_from=settings.twilio_whatsapp_from,
        )
        senders["sms"] = twilio
        closers.append(twilio.close)
    else:
        hold_reasons["sms"] = "TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN are not set"
    meta: MetaSender | None = None
    if settings.meta_access_token:
        meta = MetaSender(settings.meta_graph_url or GRAPH_URL, settings.meta_access_token)
        senders["messenger"] = senders["instagram"] = meta
        closers.append(meta.close)
    else:
        hold_reasons["messenger"] = hold_reasons["instagram"] = "META_ACCESS_TOKEN is not set"
    if twilio is not None or meta is not None:
        senders["whatsapp"] = WhatsAppRouter(twilio=twilio, meta=meta)
    else:
        hold_reasons["whatsapp"] = "neither Twilio nor Meta is configured"
    return Channels(publisher, routes, senders, hold_reasons, closers, surveys)


def customer_email(db: ReadModelDB, conversation_id: str) -> str | None:
    """The email address of a conversation's customer, from the inbox view."""
    with db.read() as tx:
        item = get_item(tx, conversation_id)
    if item is None:
        return None
    for identity in item["customer"]["identities"]:
        if identity.startswith("email:"):
            return str(identity[len("email:") :])
    return None


def build_directory(parts: Parts) -> Directory:
    return Directory(parts.store, admin_token=parts.settings.admin_token)


def build_http_app(
    parts: Parts,
    routes: list[BaseRoute] | None = None,
    *,
    stored: Callable[[], None] = lambda: None,
    survey_text: SurveyText | None = None,
) -> Starlette:
    """`stored`: told after a command stored events (wakes routing and the stream here)."""
    commands = Commands(parts.store)
    if survey_text is not None:
        commands.survey_text = survey_text
    return create_app(
        ApiContext(
            parts.store,
            parts.read_models,
            parts.settings.admin_token,
            commands=commands,
            directory=build_directory(parts),
            stored=stored,
        ),
        extra_routes=routes or [],
    )


class QueueSkills:
    """Queue name -> the skill it needs, from the directory view, re-read at most every
    second (queues change rarely; the stream asks for every frame)."""

    def __init__(self, db: ReadModelDB) -> None:
        self.db = db
        self._at = -1.0
        self._skills: dict[str, str | None] = {}

    def __call__(self, queue: str) -> str | None:
        now = time.monotonic()
        if now - self._at > 1.0:
            try:
                self._skills = {q["name"]: q.get("skill") for q in list_queues(self.db)}
            except DatabaseError as exc:
                # The last answer stands: the stream asks in the middle of fanning out a
                # batch, and an error there would send part of it twice.
                log.warning("queue skills not read again (%s): using the last ones", exc)
            self._at = now
        return self._skills.get(queue)


def conversation_scope(db: ReadModelDB, conversation_id: str) -> ConversationScope | None:
    with db.read() as tx:
        item = get_item(tx, conversation_id)
    if item is None:
        return None
    return ConversationScope(
        queue=item["queue"],
        assignee=item["assignee"],
        offered_to=item["offered_to"],
        status=item["status"],
    )


def build_stream_hub(parts: Parts) -> StreamHub:
    directory = build_directory(parts)

    async def authenticate(token: str) -> Principal | None:
        return await asyncio.to_thread(directory.authenticate, token)

    async def gone(agent_id: str) -> None:
        """Disconnected past the grace period: an available agent becomes away (routing
        stops offering them work)."""
        agent = await asyncio.to_thread(directory.agent, agent_id)
        if agent is not None and agent.presence == "available":
            await asyncio.to_thread(
                directory.set_presence,
                agent_id,
                "away",
                reason="stream disconnected",
                actor=agent_id,
            )

    return StreamHub(
        parts.store,
        authenticate=authenticate,
        queue_skill=QueueSkills(parts.read_models),
        lookup=lambda conversation: conversation_scope(parts.read_models, conversation),
        on_gone=gone,
    )


def build_smtp_server(settings: Settings, publisher: KafkaPublisher) -> SmtpServer:
    tls: ssl.SSLContext | None = None
    if settings.smtp_tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(settings.smtp_tls_cert, settings.smtp_tls_key)
    auth: dict[str, str] | None = None
    if settings.smtp_auth_file:
        # "user:password" a line; AUTH is offered only over STARTTLS.
        lines = Path(settings.smtp_auth_file).read_text().splitlines()
        auth = dict(line.split(":", 1) for line in lines if ":" in line)
    return smtp_server(
        publisher,
        host=settings.smtp_host,
        port=settings.smtp_port,
        domains=settings.email_domains,
        data_dir=settings.data_dir,
        max_size=settings.smtp_max_bytes,
        tls_context=tls,
        require_starttls=settings.smtp_require_tls,
        auth=auth,
    )


def build_worker(parts: Parts) -> IngestWorker:
    settings = parts.settings
    assert settings.kafka_bootstrap is not None
    config = WorkerConfig(
        bootstrap=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        topic=settings.contact_events_topic,
        dead_letter_topic=settings.dead_letter_topic,
        idempotence=settings.kafka_idempotence,
    )
    return IngestWorker(config, parts.store)


# The inbox view is what agents wait on; the other read models give way to it while it is
# behind the log (`Lead`). Reports are the slowest to build and get a runner of their own, so
# the timeline and escalations never move at their pace.
LEADING = "inbox"
REPORTS = frozenset({"metrics", "contacts_weekly"})


@dataclass(frozen=True)
class RunnerThread:
    runner: ProjectionRunner
    leads: Lead | None = None
    follows: Lead | None = None


def build_projection_runners(parts: Parts) -> list[RunnerThread]:
    lead = Lead()
    groups = (
        [f() for n, f in PROJECTIONS.items() if n == LEADING],
        [f() for n, f in PROJECTIONS.items() if n != LEADING and n not in REPORTS],
        [f() for n, f in PROJECTIONS.items() if n in REPORTS],
    )
    first, *rest = [ProjectionRunner(parts.store, parts.read_models, g) for g in groups]
    return [RunnerThread(first, leads=lead), *(RunnerThread(r, follows=lead) for r in rest)]


@contextlib.asynccontextmanager
async def projections_in_thread(runners: list[RunnerThread]) -> AsyncIterator[None]:
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=r.runner.run_forever,
            args=(stop,),
            kwargs={"leads": r.leads, "follows": r.follows},
            name=f"projections-{i}",
            daemon=True,
        )
        for i, r in enumerate(runners)
    ]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 10)


async def _start_voice(
    parts: Parts,
    running: contextlib.AsyncExitStack,
    stop: asyncio.Event,
    publisher: KafkaPublisher | None,
) -> list[asyncio.Task[Any]]:
    """The callback dialer and the call connector (Twilio's REST API); one of each, in the
    routing process. Both publish the calls they put through (`call.answered`, and the
    dialer `call.ended` of a callback), so they need Kafka."""
    settings = parts.settings
    assert settings.twilio_account_sid
    assert settings.twilio_auth_token
    calls = TwilioRestCalls(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base
    )
    running.push_async_callback(calls.close)
    directory = build_directory(parts)
    voice_to = directory_voice_to(directory)
    tasks: list[asyncio.Task[Any]] = []
    if settings.twilio_caller_id:
        dialer = CallbackDialer(
            parts.store,
            calls=calls,
            caller_id=settings.twilio_caller_id,
            agent_voice_to=voice_to,
            hours_for=queue_hours(directory),
            publisher=publisher,
        )
        tasks.append(asyncio.create_task(dialer.run(stop), name="dialer"))
    else:
        log.warning("TWILIO_CALLER_ID is not set: callbacks wait, nobody dials them")
    if publisher is not None:
        connector = CallConnector(
            parts.store, calls=calls, publisher=publisher, agent_voice_to=voice_to
        )
        tasks.append(asyncio.create_task(connector.run(stop), name="connector"))
    else:
        log.warning("no Kafka for the call connector: set INBOX_KAFKA_BOOTSTRAP")
    return tasks


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _serve_http(app: Starlette, settings: Settings, stop: asyncio.Event) -> None:
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        lifespan="on",
        # agents' screens ask again every few seconds: keep their connections (uvicorn: 5 s)
        timeout_keep_alive=60,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    stopped.cancel()
    if not stop.is_set():
        raise RuntimeError(f"HTTP server on {settings.http_host}:{settings.http_port} stopped")


async def _start_kafka(settings: Settings, stack: contextlib.ExitStack) -> Settings:
    if settings.kafka_bootstrap is None:
        broker = EmbeddedBroker(log_path=settings.data_dir / "broker.log")
        await asyncio.to_thread(broker.start)
        stack.callback(broker.stop)
        settings = replace(settings, kafka_bootstrap=broker.bootstrap, kafka_idempotence=False)
    assert settings.kafka_bootstrap is not None
    await ensure_topics(settings.kafka_bootstrap, app_topics(settings))
    return settings


def _banner(settings: Settings, parts_started: list[str], say: Callable[[str], None]) -> None:
    url = f"http://{settings.http_host}:{settings.http_port}"
    public = settings.public_url
    say(f"inbox: {', '.join(parts_started)}")
    if "HTTP" in parts_started:
        say(f"  HTTP API          {url}/api/v1/conversations")
        say(f"  health, metrics   {url}/healthz  {url}/metrics")
        say(
            f"  web chat          ws://{settings.http_host}:{settings.http_port}/chat/ws?visitor=ID"
        )
        say(
            f"  agents' stream    ws://{settings.http_host}:{settings.http_port}/api/v1/stream?token=T"
        )
        say(f"  webhooks          {public}/twilio/messaging  {public}/webhooks/meta")
        say(f"  voice (Twilio)    {public}/twilio/voice  status: {public}/twilio/voice/status")
    if "SMTP" in parts_started:
        domains = ", ".join(settings.email_domains)
        say(f"  SMTP              {settings.smtp_host}:{settings.smtp_port}  ({domains})")
    if settings.kafka_bootstrap is not None:
        topic = settings.contact_events_topic
        say(f"  Kafka             {settings.kafka_bootstrap}  (topic {topic})")
    say(f"  event store       {settings.database_url}")
    if settings.admin_token_generated and "HTTP" in parts_started:
        say(f"  admin token       {settings.admin_token}")
    say("Ctrl-C stops.")


def freeze_after_start() -> None:
    """Call once a process has started: what is alive then (modules, the menu, the app)
    lives until exit, so it is moved out of the collector's sight. Full collections then walk
    only what requests left behind instead of every object of the process, which is what
    stalled every call and request in flight (docs/ivr.md, "Speed")."""
    gc.collect()
    gc.freeze()


async def run(
    settings: Settings,
    *,
    http: bool,
    worker: bool,
    projections: bool,
    smtp: bool = False,
    delivery: bool | None = None,
    routing: bool = False,
    say: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Runs the chosen parts until SIGINT/SIGTERM (or `stop`). Delivery of replies runs with
    the HTTP part unless told otherwise: chat replies reach that process's sockets. Routing
    (the Distributor) must run in one process only: it is the one that decides offers."""
    stop = stop or asyncio.Event()
    delivery = http if delivery is None else delivery
    with contextlib.suppress(NotImplementedError, RuntimeError):
        _stop_on_signals(stop)
    # A bad menu file stops the start, before anything runs, with every problem named.
    menu = load_ivr_menu(settings) if http else None
    with contextlib.ExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if http or worker or smtp or delivery:
            settings = await _start_kafka(settings, stack)
        parts = build_parts(settings)
        stack.callback(parts.close)
        async with contextlib.AsyncExitStack() as running:
            tasks: list[asyncio.Task[Any]] = []
            started: list[str] = []
            wakers: list[Callable[[], None]] = []

            def stored() -> None:
                for wake in wakers:
                    wake()

            distributor: Distributor | None = None
            if routing:
                distributor = Distributor(
                    parts.store,
                    build_directory(parts),
                    states=ReadModelProcessStates(parts.read_models),
                )
                wakers.append(distributor.nudge)
                tasks.append(
                    asyncio.create_task(distributor.run(stop, stored=stored), name="routing")
                )
                started.append("routing")
            elif http and settings.twilio_auth_token:
                # the IVR's wait loop needs the queues' live picture: a mirror that decides
                # nothing (the routing process decides)
                distributor = Distributor(
                    parts.store,
                    build_directory(parts),
                    decide=False,
                    states=ReadModelProcessStates(parts.read_models),
                )
                tasks.append(asyncio.create_task(distributor.run(stop), name="queue mirror"))

            if projections:
                await running.enter_async_context(
                    projections_in_thread(build_projection_runners(parts))
                )
                started.append("projections")
            if worker:
                tasks.append(asyncio.create_task(build_worker(parts).run(stop), name="worker"))
                started.append("ingest worker")
            if (worker or routing) and not http and settings.metrics_port is not None:
                # Without the HTTP API, a worker's counters and routing's live gauges (queues,
                # agents, callbacks) are shown to Prometheus on a port of their own.
                metrics, thread = start_http_server(settings.metrics_port, settings.http_host)
                stack.callback(thread.join, 5)
                stack.callback(metrics.shutdown)
                started.append(f"metrics on :{settings.metrics_port}")
            channels = (
                build_channels(parts, menu=menu, queues=distributor)
                if (http or smtp or delivery)
                else None
            )
            if channels is not None:
                for close in channels.closers:
                    running.push_async_callback(close)
            if routing and settings.twilio_account_sid and settings.twilio_auth_token:
                publisher = channels.publisher if channels is not None else None
                if publisher is None and settings.kafka_bootstrap is not None:
                    publisher = build_publisher(settings)
                    running.push_async_callback(publisher.close)
                tasks.extend(await _start_voice(parts, running, stop, publisher))
                started.append("callback dialer and call connector")
            if http:
                assert channels is not None
                hub = build_stream_hub(parts)
                wakers.append(hub.nudge)
                tasks.append(asyncio.create_task(hub.run(stop), name="stream"))
                app = build_http_app(
                    parts,
                    [*channels.routes, *hub.routes()],
                    stored=stored,
                    survey_text=channels.surveys.text,
                )
                tasks.append(asyncio.create_task(_serve_http(app, settings, stop), name="http"))
                started.append("HTTP")
            if smtp:
                assert channels is not None
                server = build_smtp_server(settings, channels.publisher)
                await server.start()
                running.push_async_callback(server.stop)
                started.append("SMTP")
            if delivery:
                assert channels is not None
                service = DeliveryService(
                    parts.store,
                    parts.read_models,
                    channels.senders,
                    channels.publisher,
                    hold_reasons=channels.hold_reasons,
                )
                tasks.append(asyncio.create_task(service.run(stop), name="delivery"))
                started.append("delivery")
            await asyncio.sleep(0)
            freeze_after_start()
            _banner(settings, started, say)
            await asyncio.wait(
                [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
