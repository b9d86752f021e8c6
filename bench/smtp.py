"""SMTP intake benchmark: mails of 20 KB per second accepted by the email channel, each answered
250 only after Kafka acknowledged its contact event, beside the raw limit measured in the same
run (the same mails, the same client, to an aiosmtpd server whose handler discards them).

    python -m bench.smtp [--mails 3000] [--connections 16] [--size 20000] [--partitions N]
                         [--sender aiosmtplib|lean]

The server runs as deployed (adapters.email_in.smtp_server on one asyncio loop, with a real
KafkaPublisher on the embedded broker, or INBOX_KAFKA_BOOTSTRAP, into a topic of the deployed
partition count: INBOX_KAFKA_PARTITIONS, 8 by default). The client is a separate
process (aiosmtplib, one persistent session per connection), so it does not share the server's
loop or interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

from adapters.email_in import InboxSMTP, smtp_server
from adapters.kafka import KafkaPublisher
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import ensure_topics, make_consumer
from infra.settings import load_settings

DOMAIN = "example.com"


def make_mail(n: int, size: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = f"Customer {n % 500} <customer{n % 500}@customer.test>"
    mail["To"] = f"support@{DOMAIN}"
    mail["Subject"] = f"Order {n} not delivered"
    mail["Date"] = "Fri, 27 Nov 2026 09:12:44 +0100"
    mail["Message-ID"] = f"<bench-{n}-{uuid.uuid4().hex}@customer.test>"
    line = "my order has not arrived and I would like to know where it is, thanks. "
    body = f"Hello,\n\nmessage {n}.\n" + (line + "\n") * max(size // (len(line) + 1), 1)
    mail.set_content(body[:size])
    return mail.as_bytes()


# --------------------------------------------------------------------------- client process


def smtp_data(message: bytes) -> bytes:
    """A message as DATA sends it: CRLF line ends, leading dots doubled, the final `.CRLF`."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    lines = [await reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(await reader.readline())
    if not lines[-1]:
        raise ConnectionError("the server closed the connection")
    return b"".join(lines)


async def _lean_connection(port: int, queue: asyncio.Queue[bytes], failures: list[str]) -> None:
    """The SMTP exchange sendmail makes, one command at a time (no PIPELINING), written straight
    to the socket with the data prepared beforehand: the sender's own cost kept small, so the
    figure is the server's on a machine the client shares."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO bench.customer.test\r\n")
        await _reply(reader)
        while True:
            try:
                data = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            for command, expected in (
                (b"MAIL FROM:<bench@customer.test>\r\n", b"250"),
                (f"RCPT TO:<support@{DOMAIN}>\r\n".encode(), b"250"),
                (b"DATA\r\n", b"354"),
                (data, b"250"),
            ):
                writer.write(command)
                answer = await _reply(reader)
                if not answer.startswith(expected):
                    failures.append(answer.decode("ascii", "replace").strip())
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    break
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        await writer.wait_closed()


async def _client(
    port: int, mails: int, connections: int, size: int, sender: str
) -> dict[str, Any]:
    messages = [make_mail(n, size) for n in range(mails)]
    if sender == "lean":
        messages = [smtp_data(message) for message in messages]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)
    failures: list[str] = []

    async def connection() -> None:
        if sender == "lean":
            await _lean_connection(port, queue, failures)
            return
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120, start_tls=False)
        await client.connect()
        try:
            while True:
                try:
                    message = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await client.sendmail("bench@customer.test", [f"support@{DOMAIN}"], message)
                except aiosmtplib.SMTPException as exc:
                    failures.append(str(exc))
        finally:
            await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"mails": mails, "failures": len(failures), "elapsed": elapsed, "first": failures[:3]}


def run_client(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """Runs the client process against `port`; adds the CPU time this (the server's) process
    spent meanwhile, per mail: on a shared machine a steadier figure than the rate."""
    cpu = time.process_time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.smtp",
            "--client",
            str(port),
            "--mails",
            str(args.mails),
            "--connections",
            str(args.connections),
            "--size",
            str(args.size),
            "--sender",
            args.sender,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["server_cpu_ms"] = (time.process_time() - cpu) / args.mails * 1000
    return result


# --------------------------------------------------------------------------- servers


class Discard:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def raw_limit(args: argparse.Namespace, protocol: type[SMTP]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    handler = Discard()
    server = await loop.create_server(
        lambda: protocol(handler, hostname=DOMAIN, data_size_limit=25 * 1024 * 1024, loop=loop),
        "127.0.0.1",
        0,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        return await asyncio.to_thread(run_client, args, port)
    finally:
        server.close()
        await server.wait_closed()


async def count_records(bootstrap: str, topic: str, expected: int) -> int:
    consumer = make_consumer(bootstrap, None, topic)
    await consumer.start()
    try:
        seen = 0
        deadline = time.monotonic() + 60
        while seen < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                seen += len(records)
        return seen
    finally:
        await consumer.stop()


async def pipeline(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    topic = f"bench-email-{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {topic: args.partitions})
    publisher = KafkaPublisher(bootstrap, idempotence=False, topic=topic)
    with tempfile.TemporaryDirectory(prefix="bench-smtp-") as data_dir:
        server = smtp_server(
            publisher, host="127.0.0.1", port=0, domains=[DOMAIN], data_dir=data_dir
        )
        async with server:
            result = await asyncio.to_thread(run_client, args, server.port)
    await publisher.close()
    result["published"] = await count_records(bootstrap, topic, args.mails)
    return result


async def main(args: argparse.Namespace) -> None:
    bootstrap = os.environ.get("INBOX_KAFKA_BOOTSTRAP")
    broker: EmbeddedBroker | None = None
    if bootstrap is None:
        broker = EmbeddedBroker(port=free_port(), log_path=Path(tempfile.gettempdir()) / "b.log")
        await asyncio.to_thread(broker.start)
        bootstrap = broker.bootstrap
    try:
        ours = await pipeline(args, bootstrap)
        limit = await raw_limit(args, SMTP)
        ours_limit = await raw_limit(args, InboxSMTP)
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    rate = ours["mails"] / ours["elapsed"]
    raw_rate = limit["mails"] / limit["elapsed"]
    ours_raw_rate = ours_limit["mails"] / ours_limit["elapsed"]
    print(
        f"{args.mails} mails of {args.size} B over {args.connections} connections "
        f"(client: {args.sender}, in its own process), topic of {args.partitions} partitions"
    )
    print(
        f"email channel (parse + Kafka ack before 250): {rate:8.0f} emails/s   "
        f"({ours['elapsed']:.2f} s, failures {ours['failures']}, "
        f"records in Kafka {ours['published']}, server CPU {ours['server_cpu_ms']:.2f} ms/mail)"
    )
    print(
        f"raw limit (aiosmtpd, handler discards):        {raw_rate:8.0f} emails/s   "
        f"({limit['elapsed']:.2f} s, failures {limit['failures']}, "
        f"server CPU {limit['server_cpu_ms']:.2f} ms/mail)"
    )
    print(
        f"raw limit (InboxSMTP, handler discards):       {ours_raw_rate:8.0f} emails/s   "
        f"({ours_limit['elapsed']:.2f} s, failures {ours_limit['failures']}, "
        f"server CPU {ours_limit['server_cpu_ms']:.2f} ms/mail)"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if ours["failures"] or ours["published"] != args.mails:
        print(f"WARNING: failures {ours['first']}", file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mails", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=None, help="of the bench's topic")
    parser.add_argument(
        "--sender",
        choices=("aiosmtplib", "lean"),
        default="aiosmtplib",
        help="the client: aiosmtplib's sendmail, or SMTP written straight to the socket",
    )
    parser.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        result = asyncio.run(
            _client(args.client, args.mails, args.connections, args.size, args.sender)
        )
        print(json.dumps(result))
        return
    if args.partitions is None:
        args.partitions = load_settings().kafka_partitions
    # The server side runs on uvloop, as `inbox smtp` and `inbox dev` do (the raw limit too).
    uvloop.run(main(args))


if __name__ == "__main__":
    cli()
