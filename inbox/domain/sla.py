"""SLA policies and their clocks. Pure: the projections and the SLA monitor pass in the
conversation's facts and the current time, and get the same answer from the same facts.

Targets are business time on the policy's calendar (`BusinessHours`): a 4h first-response
target on a conversation opened Friday 16:00 with Mon-Fri 09:00-17:00 hours is due Monday
12:00. Durations in the dict form are seconds (a number) or strings such as "90s", "30m", "4h",
"3d" or "1h30m"; a "d" is 24 hours of business time, not a working day.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal

from inbox.domain.business_hours import BusinessHours, CalendarError

ClockKind = Literal["first_response", "next_response", "resolution"]
ClockStatus = Literal["ok", "warning", "breached"]
KINDS: tuple[ClockKind, ...] = ("first_response", "next_response", "resolution")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


class SlaPolicyError(ValueError):
    """A policy refused; the message starts with the place of the problem."""


@dataclass(frozen=True)
class SlaTargets:
    """Seconds of business time; None = no target of that kind."""

    first_response: float | None = None
    next_response: float | None = None
    resolution: float | None = None

    def __post_init__(self) -> None:
        for kind in KINDS:
            _check_seconds(getattr(self, kind), kind)

    def get(self, kind: ClockKind) -> float | None:
        seconds: float | None = getattr(self, kind)
        return seconds

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> SlaTargets:
        if not isinstance(data, Mapping):
            raise SlaPolicyError(f"{where}: expected a table, got {type(data).__name__}")
        for key in data:
            if key not in KINDS:
                raise SlaPolicyError(f"{where}.{key}: unknown target (expected {', '.join(KINDS)})")
        return cls(**{kind: parse_duration(data.get(kind), f"{where}.{kind}") for kind in KINDS})

    def to_dict(self) -> dict[str, Any]:
        return {kind: format_duration(s) for kind in KINDS if (s := self.get(kind)) is not None}


@dataclass(frozen=True)
class SlaPolicy:
    """`targets` by priority (0 = normal, higher = more urgent); a priority without its own
    entry uses the nearest lower one, and one below them all the lowest. `warn_ratio`: the
    share of a target after which its clock warns (0 < ratio <= 1)."""

    queue: str
    targets: Mapping[int, SlaTargets]
    hours: BusinessHours = field(default_factory=BusinessHours.always)
    warn_ratio: float = 0.8
    _priorities: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise SlaPolicyError(f"queue: expected a queue name, got {self.queue!r}")
        if not self.targets:
            raise SlaPolicyError("targets: at least one priority needs targets")
        for priority, targets in self.targets.items():
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise SlaPolicyError(f"targets[{priority!r}]: a priority is an integer")
            if not isinstance(targets, SlaTargets):
                raise SlaPolicyError(f"targets[{priority}]: expected SlaTargets")
        if not isinstance(self.hours, BusinessHours):
            raise SlaPolicyError("hours: expected BusinessHours")
        if not self.hours.weekly:
            raise SlaPolicyError("hours: never open, so no target would ever come due")
        ratio = self.warn_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise SlaPolicyError(f"warn_ratio: expected a number in (0, 1], got {ratio!r}")
        by_priority = dict(sorted(self.targets.items()))
        object.__setattr__(self, "targets", MappingProxyType(by_priority))  # frozen: normalise
        object.__setattr__(self, "_priorities", tuple(by_priority))

    def __hash__(self) -> int:
        return hash((self.queue, tuple(self.targets.items()), self.hours, self.warn_ratio))

    def targets_for(self, priority: int) -> SlaTargets:
        i = bisect_right(self._priorities, priority)
        return self.targets[self._priorities[max(i - 1, 0)]]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "sla") -> SlaPolicy:
        """`{"queue": "billing", "timezone": "Europe/Berlin", "hours": {...},
        "targets": {"0": {"first_response": "4h", ...}, "2": {...}}, "warn_ratio": 0.8}`.
        `timezone` is the calendar's when `hours` gives none; no `hours` = open 24/7.
        Raises SlaPolicyError naming the place, e.g. `sla.targets.2.first_response: ...`."""
        if not isinstance(data, Mapping):
            raise SlaPolicyError(f"{where}: expected a table, got {type(data).__name__}")
        for key in data:
            if key not in ("queue", "timezone", "hours", "targets", "warn_ratio"):
                raise SlaPolicyError(
                    f"{where}.{key}: unknown key (expected queue, timezone, hours, targets, "
                    "warn_ratio)"
                )
        queue = data.get("queue")
        if not isinstance(queue, str) or not queue:
            raise SlaPolicyError(f"{where}.queue: expected a queue name, got {queue!r}")
        raw_targets = data.get("targets")
        if not isinstance(raw_targets, Mapping) or not raw_targets:
            raise SlaPolicyError(f"{where}.targets: expected a table of priorities with targets")
        targets = {
            _priority(key, f"{where}.targets.{key}"): SlaTargets.from_dict(
                value, f"{where}.targets.{key}"
            )
            for key, value in raw_targets.items()
        }
        if len(targets) < len(raw_targets):
            raise SlaPolicyError(f"{where}.targets: a priority is given twice")
        ratio = data.get("warn_ratio", 0.8)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise SlaPolicyError(f"{where}.warn_ratio: expected a number in (0, 1], got {ratio!r}")
        hours = _hours(data, f"{where}")
        try:
            return cls(queue, targets, hours, float(ratio))
        except SlaPolicyError as error:
            raise SlaPolicyError(f"{where}.{error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "timezone": self.hours.tz,
            "hours": self.hours.to_dict(),
            "targets": {str(p): t.to_dict() for p, t in self.targets.items()},
            "warn_ratio": self.warn_ratio,
        }


@dataclass(frozen=True)
class SlaClock:
    """One running target: it started at `started_at` (the event time, even outside hours),
    warns at `warn_at` and is breached at `due_at` (both in business time, UTC)."""

    kind: ClockKind
    started_at: datetime
    due_at: datetime
    warn_at: datetime


def running_clocks(
    policy: SlaPolicy,
    priority: int,
    *,
    opened_at: datetime,
    first_response_at: datetime | None,
    waiting_since: datetime | None,
    resolved: bool,
) -> list[SlaClock]:
    """The clocks running for a conversation, in the order first_response, next_response,
    resolution. A resolved conversation runs none. first_response runs from `opened_at` until
    the first agent response; next_response from `waiting_since` (the oldest unanswered
    customer message) once a first response exists, never from before that response;
    resolution from `opened_at`."""
    if resolved:
        return []
    targets = policy.targets_for(priority)
    starts: list[tuple[ClockKind, datetime]] = []
    if first_response_at is None:
        starts.append(("first_response", opened_at))
    elif waiting_since is not None:
        starts.append(("next_response", max(waiting_since, first_response_at)))
    starts.append(("resolution", opened_at))
    clocks = []
    for kind, started_at in starts:
        seconds = targets.get(kind)
        if seconds is not None:
            clocks.append(_clock(policy, kind, started_at, seconds))
    return clocks


def earliest_due(clocks: Iterable[SlaClock]) -> SlaClock | None:
    """The clock due first (the first listed among equals); None when none runs."""
    return min(clocks, key=lambda clock: clock.due_at, default=None)


def status(clock: SlaClock, now: datetime) -> ClockStatus:
    if now >= clock.due_at:
        return "breached"
    if now >= clock.warn_at:
        return "warning"
    return "ok"


def parse_duration(value: object, where: str) -> float | None:
    """Seconds (a number) or "90s", "30m", "4h", "3d", "1h30m" (a "d" is 24 hours); None stays
    None (no target)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip()):
        parts = _PART_RE.findall(value.strip())
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    else:
        raise SlaPolicyError(
            f'{where}: {value!r} is not a duration (seconds, or e.g. "90s", "30m", "4h", "3d")'
        )
    _check_seconds(seconds, where)
    return seconds


def format_duration(seconds: float) -> str | float:
    """The largest whole unit ("4h", "90m"), else the number of seconds."""
    if seconds != int(seconds):
        return seconds
    whole = int(seconds)
    for unit in ("d", "h", "m", "s"):
        if whole % _UNITS[unit] == 0:
            return f"{whole // _UNITS[unit]}{unit}"
    return seconds  # unreachable: every whole number of seconds is a multiple of "s"


def _clock(policy: SlaPolicy, kind: ClockKind, started_at: datetime, seconds: float) -> SlaClock:
    hours = policy.hours
    return SlaClock(
        kind=kind,
        started_at=started_at,
        due_at=hours.add(started_at, seconds),
        warn_at=hours.add(started_at, seconds * policy.warn_ratio),
    )


def _check_seconds(seconds: object, where: str) -> None:
    if seconds is None:
        return
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise SlaPolicyError(f"{where}: a target is a positive number of seconds, got {seconds!r}")


def _priority(key: object, where: str) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
        return int(key)
    raise SlaPolicyError(f"{where}: a priority is an integer, got {key!r}")


def _hours(data: Mapping[str, Any], where: str) -> BusinessHours:
    timezone = data.get("timezone")
    raw = data.get("hours")
    try:
        if raw is None:
            return BusinessHours.always(timezone or "UTC")
        if isinstance(raw, Mapping) and "timezone" not in raw and timezone is not None:
            raw = {"timezone": timezone, **raw}
        hours = BusinessHours.from_dict(raw, f"{where}.hours")
    except CalendarError as error:
        raise SlaPolicyError(str(error)) from None
    if timezone is not None and timezone != hours.tz:
        raise SlaPolicyError(
            f"{where}.timezone: {timezone!r} differs from {where}.hours.timezone {hours.tz!r}"
        )
    return hours
