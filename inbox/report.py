"""`inbox report`: the KPIs of the metrics read model as a table, JSON (the shape of
`GET /api/v1/metrics`), CSV (one row per bucket) or a PNG chart for a slide: inbound volume by
channel as stacked bars and the service level as a line on the right axis, per bucket."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, cast

import orjson

from projections.db import ReadModelDB
from projections.metrics import CHANNELS
from projections.metrics_query import KPI_KEYS, metrics

Format = Literal["table", "json", "csv", "png"]
FORMATS = ("table", "json", "csv", "png")
_SCALARS = [k for k in KPI_KEYS if k not in ("volume", "callbacks")]
_CALLBACKS = (
    "requested",
    "completed",
    "failed",
    "mean_time_to_callback",
    "mean_time_to_callback_business",
)
_SHARES = frozenset(
    {
        "resolved_within_24h",
        "abandonment_rate",
        "service_level",
        "fcr",
        "csat",
        "escalation_rate",
        "agent_utilization",
    }
)
# one colour per channel, fixed, so that slides of different weeks compare
_COLOURS = {
    "email": "#4C72B0",
    "voice": "#DD8452",
    "sms": "#55A868",
    "whatsapp": "#2CA02C",
    "messenger": "#8172B3",
    "instagram": "#DA8BC3",
    "chat": "#937860",
    "other": "#8C8C8C",
}


def report(
    db: ReadModelDB,
    *,
    start: datetime,
    end: datetime,
    bucket: str,
    fmt: Format | str,
    out: IO[str] | IO[bytes] | Path | str,
    tz: str = "UTC",
    channel: str | None = None,
    queue: str | None = None,
    agent: str | None = None,
    service_level_seconds: float = 20.0,
) -> dict[str, Any]:
    """Writes the report to `out` (a path, or an open file: text for table/csv/json... or
    binary; PNG and JSON are bytes, written to a binary file or `.buffer`) and returns the
    metrics it shows. Raises QueryError for a bad range, bucket or zone, ValueError for an
    unknown format."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    result = metrics(
        db,
        start=start,
        end=end,
        bucket=bucket,
        tz=tz,
        channel=channel,
        queue=queue,
        agent=agent,
        service_level_seconds=service_level_seconds,
    )
    if fmt == "json":
        _write(out, orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    elif fmt == "csv":
        _write(out, to_csv(result).encode())
    elif fmt == "png":
        title = f"{_when(start, tz)} - {_when(end, tz)} ({tz}, by {bucket})"
        _write(out, to_png(result, title=title, service_level_seconds=service_level_seconds))
    else:
        _write(out, to_table(result, title=f"KPIs {_when(start, tz)} - {_when(end, tz)}").encode())
    return result


def _when(at: datetime, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return at.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


def _write(out: IO[str] | IO[bytes] | Path | str, data: bytes) -> None:
    if isinstance(out, str | Path):
        Path(out).write_bytes(data)
        return
    if isinstance(out, io.TextIOBase):
        buffer = getattr(out, "buffer", None)
        if buffer is None:  # a text-only stream (StringIO): fine for text formats
            out.write(data.decode())
            return
        out.flush()  # sys.stdout: what was printed before comes first
        buffer.write(data)
        buffer.flush()
        return
    cast(IO[bytes], out).write(data)


def _flat(kpis: dict[str, Any]) -> dict[str, Any]:
    row = {key: kpis[key] for key in _SCALARS}
    row.update({f"volume_{c}": n for c, n in kpis["volume"].items()})
    row.update({f"callbacks_{k}": kpis["callbacks"][k] for k in _CALLBACKS})
    return row


def to_csv(result: dict[str, Any]) -> str:
    """One row per bucket: start, end, then every KPI (volume and callbacks spread into
    `volume_<channel>` and `callbacks_<field>` columns); empty where the KPI is null."""
    text = io.StringIO()
    columns = [
        "start",
        "end",
        *_SCALARS,
        *(f"volume_{c}" for c in CHANNELS),
        *(f"callbacks_{k}" for k in _CALLBACKS),
    ]
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for b in result["buckets"]:
        writer.writerow({"start": b["start"], "end": b["end"], **_flat(b["kpis"])})
    return text.getvalue()


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in _SHARES:
        return f"{value:.0%}"
    if isinstance(value, float):
        return _duration(value)
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def to_table(result: dict[str, Any], *, title: str) -> str:
    """A rich table: a row per bucket with the main KPIs, and a total row."""
    from rich.console import Console
    from rich.table import Table

    shown = (
        ("volume", "contacts"),
        ("first_response_time", "FRT"),
        ("resolution_time", "resolution"),
        ("asa", "ASA"),
        ("service_level", "SL"),
        ("abandonment_rate", "aband."),
        ("aht", "AHT"),
        ("fcr", "FCR"),
        ("csat", "CSAT"),
        ("escalation_rate", "escal."),
        ("agent_utilization", "util."),
    )
    table = Table(title=title)
    table.add_column("bucket")
    for _, label in shown:
        table.add_column(label, justify="right")

    def cells(kpis: dict[str, Any]) -> list[str]:
        return [
            str(sum(kpis["volume"].values())) if key == "volume" else _cell(key, kpis[key])
            for key, _ in shown
        ]

    for b in result["buckets"]:
        table.add_row(b["start"][:16].replace("T", " "), *cells(b["kpis"]))
    table.add_row("total", *cells(result["total"]), style="bold")
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(table)
    callbacks = result["total"]["callbacks"]
    console.print(
        f"callbacks: {callbacks['requested']} requested, {callbacks['completed']} completed, "
        f"{callbacks['failed']} failed; mean time to callback "
        f"{_cell('mean', callbacks['mean_time_to_callback'])}"
    )
    output: str = console.file.getvalue()  # type: ignore[attr-defined]
    return output


def to_png(result: dict[str, Any], *, title: str, service_level_seconds: float = 20.0) -> bytes:
    """Stacked bars of inbound volume by channel and the service level as a line (right axis,
    0-100 %), per bucket; a PNG for a slide (16:9, 150 dpi)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the chart is a file
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    buckets = result["buckets"]
    labels = [b["start"][:16].replace("T", " ") for b in buckets]
    x = list(range(len(buckets)))
    channels = [c for c in (*CHANNELS, "other") if any(b["kpis"]["volume"].get(c) for b in buckets)]
    fig, ax = plt.subplots(figsize=(12.8, 7.2), dpi=150)
    try:
        bottom = [0] * len(buckets)
        for channel in channels:
            heights = [b["kpis"]["volume"].get(channel, 0) for b in buckets]
            ax.bar(x, heights, bottom=bottom, label=channel, color=_COLOURS[channel], width=0.8)
            bottom = [a + h for a, h in zip(bottom, heights, strict=True)]
        ax.set_ylabel("inbound contacts")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max([*bottom, 1]) * 1.15)
        right = ax.twinx()
        levels = [b["kpis"]["service_level"] for b in buckets]
        right.plot(
            x,
            [float("nan") if v is None else v for v in levels],
            color="#C44E52",
            marker="o",
            markersize=3,
            linewidth=2,
            label=f"service level ({service_level_seconds:g} s)",
        )
        right.set_ylim(0, 1.05)
        right.yaxis.set_major_formatter(PercentFormatter(1.0))
        right.set_ylabel(f"answered within {service_level_seconds:g} s")
        step = max(1, len(x) // 24)  # at most ~24 labels, whatever the range
        ax.set_xticks(x[::step], labels[::step], rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(x) - 0.4)
        total = result["total"]
        sl = total["service_level"]
        ax.set_title(
            f"{title}\n{sum(total['volume'].values()):,} contacts, service level "
            f"{'-' if sl is None else f'{sl:.0%}'}",
            fontsize=13,
        )
        handles, names = ax.get_legend_handles_labels()
        more, more_names = right.get_legend_handles_labels()
        ax.legend(handles + more, names + more_names, loc="upper left", ncol=4, frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        data = io.BytesIO()
        fig.savefig(data, format="png")
        return data.getvalue()
    finally:
        plt.close(fig)
