"""`inbox`: the command line (CONTRACT.md, "Running it")."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

import orjson


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inbox", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="everything in one process tree, embedded broker unless configured")
    sub.add_parser("serve", help="HTTP API, webhooks, web chat, projections, reply delivery")
    sub.add_parser("worker", help="the ingest worker (run several in one consumer group)")
    sub.add_parser("smtp", help="the SMTP server of the email channel")
    sub.add_parser("route", help="routing and SLA monitoring (run exactly one)")
    replay = sub.add_parser("replay", help="rebuild a projection from the event store")
    replay.add_argument("name")
    replay.add_argument("--from-start", action="store_true", help="a fresh rebuild from event 1")
    replay.add_argument("--follow", action="store_true", help="keep it up to date afterwards")
    replay.add_argument(
        "--current-sla",
        action="store_true",
        help="inbox: apply today's SLA policies to the whole history",
    )
    audit = sub.add_parser("audit", help="the full event history of a conversation or customer")
    which = audit.add_mutually_exclusive_group(required=True)
    which.add_argument("--conversation", type=UUID)
    which.add_argument("--customer", type=UUID)
    audit.add_argument("--format", choices=["table", "jsonl"], default="table")
    report = sub.add_parser("report", help="the KPIs of the metrics read model")
    report.add_argument("--from", dest="start", help="ISO 8601 (default: 24 hours ago)")
    report.add_argument("--to", dest="end", help="ISO 8601 (default: now)")
    report.add_argument("--bucket", choices=["15m", "hour", "day"], default="hour")
    report.add_argument("--format", choices=["table", "json", "csv", "png"], default="table")
    report.add_argument("--tz", default="UTC", help="the buckets' time zone")
    report.add_argument("--channel")
    report.add_argument("--queue")
    report.add_argument("--agent")
    report.add_argument("--out", help="file to write (png: default report.png)")
    ivr = sub.add_parser("ivr", help="the IVR menu")
    ivr_sub = ivr.add_subparsers(dest="ivr_command", required=True)
    check = ivr_sub.add_parser("check", help="validate a menu file; every problem with its place")
    check.add_argument("file")
    check.add_argument("--queues", help="comma-separated queue names the menu may use")
    forget = sub.add_parser("forget", help="erase a customer's personal data (kept replayable)")
    forget.add_argument("--customer", type=UUID, required=True)
    forget.add_argument("--actor", default="cli", help="who asked (recorded with the erasure)")
    return parser


def _report(args: argparse.Namespace) -> int:
    from inbox.domain.time import parse_instant
    from inbox.report import report
    from infra.settings import load_settings
    from projections.db import open_read_models

    try:
        end = parse_instant(args.end) if args.end else datetime.now(UTC)
        start = parse_instant(args.start) if args.start else end - timedelta(days=1)
    except ValueError as exc:
        print(f"inbox report: --from/--to: {exc}", file=sys.stderr)
        return 2
    out = args.out or ("report.png" if args.format == "png" else None)
    db = open_read_models(load_settings())
    try:
        report(
            db,
            start=start,
            end=end,
            bucket=args.bucket,
            fmt=args.format,
            out=out if out is not None else sys.stdout,
            tz=args.tz,
            channel=args.channel,
            queue=args.queue,
            agent=args.agent,
        )
    except ValueError as exc:
        print(f"inbox report: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _forget(args: argparse.Namespace) -> int:
    from inbox.forget import forget_customer
    from infra.settings import load_settings
    from infra.store import open_event_store
    from projections.db import open_read_models

    settings = load_settings()
    store = open_event_store(settings)
    db = open_read_models(settings)
    try:
        erasure = forget_customer(
            store, args.customer, actor=args.actor, data_dir=settings.data_dir, read_models=db
        )
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        db.close()
        store.close()
    print(
        f"customer {erasure.customer_id} forgotten: {erasure.events_rewritten} events in "
        f"{erasure.aggregates} aggregates rewritten, {erasure.attachments_deleted} attachments "
        f"deleted, {len(erasure.conversations)} conversations; recorded as Customer.Forgotten"
    )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from inbox import audit
    from infra.settings import load_settings
    from infra.store import open_event_store

    store = open_event_store(load_settings())
    try:
        if args.conversation is not None:
            entries = audit.history(store, args.conversation)
        else:
            entries = audit.customer_history(store, args.customer)
    finally:
        store.close()
    if not entries:
        print("no such conversation or customer", file=sys.stderr)
        return 1
    if args.format == "jsonl":
        for entry in entries:
            sys.stdout.buffer.write(orjson.dumps(entry) + b"\n")
        return 0
    table = Table("recorded", "at", "aggregate", "version", "event", "actor", "source")
    for entry in entries:
        source = entry.get("source") or {}
        kafka = source.get("kafka") or {}
        where = f"{kafka['topic']}[{kafka['partition']}]@{kafka['offset']}" if kafka else ""
        table.add_row(
            entry["timestamp"],
            entry["at"] or "",
            f"{entry['aggregate']} {entry['aggregate_id'][:8]}",
            str(entry["version"]),
            entry["type"],
            entry["actor"],
            f"{source.get('event_id', '')} {where}".strip(),
        )
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.command == "audit":
        return _audit(args)
    if args.command == "forget":
        return _forget(args)
    if args.command == "report":
        return _report(args)
    if args.command == "ivr":
        from ivr.cli import check_command, parse_queues

        return check_command(args.file, parse_queues(args.queues))

    if args.command == "replay":
        from projections.replay import PROJECTIONS

        if args.name not in PROJECTIONS:
            parser.error(f"unknown projection {args.name!r} (known: {', '.join(PROJECTIONS)})")

    from infra.settings import load_settings

    settings = load_settings()
    if args.command == "replay":
        from projections.replay import run_replay

        run_replay(
            settings,
            args.name,
            from_start=args.from_start,
            follow=args.follow,
            current_sla=args.current_sla,
        )
        return 0

    from infra import composition
    from ivr.menu import InvalidMenu

    if args.command not in ("dev", "route") and settings.kafka_bootstrap is None:
        print(
            f"inbox {args.command}: set INBOX_KAFKA_BOOTSTRAP (or run inbox dev)", file=sys.stderr
        )
        return 2
    http, worker, projections, smtp, routing = {
        "dev": (True, True, True, True, True),
        "serve": (True, False, True, False, False),
        "worker": (False, True, False, False, False),
        "smtp": (False, False, False, True, False),
        "route": (False, False, False, False, True),
    }[args.command]
    import uvloop  # libuv's loop: about twice the webhook throughput of asyncio's (bench/)

    if http:
        try:  # a bad menu file stops the start with every problem and its place
            composition.load_ivr_menu(settings)
        except InvalidMenu as exc:
            print(exc, file=sys.stderr)
            return 1
    uvloop.run(
        composition.run(
            settings,
            http=http,
            worker=worker,
            projections=projections,
            smtp=smtp,
            routing=routing,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
