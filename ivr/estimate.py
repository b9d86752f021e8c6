"""The wait estimate the IVR speaks on every wait loop (docs/callbacks.md, "how the wait
estimate is computed"). Pure: recent handle times come in as numbers, the clock is passed in.

The estimate is honest: with no agent able to take the queue, or no handled call to learn a
handle time from, it is None (the IVR then says nothing about time), never a made-up average.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import median
from typing import Any

DEFAULT_KEEP = 50
DEFAULT_WITHIN = timedelta(hours=8)
# Calls answered but not ended yet are remembered by call_sid; a bound so that calls whose
# end never arrives (a lost event) cannot grow the table forever.
_MAX_OPEN_CALLS = 10_000


def estimate_wait(
    *,
    position: int,
    free_agents: int,
    busy_agents: int,
    handle_times: Sequence[float],
) -> float | None:
    """Seconds until the caller at `position` (1 = next in line) is answered, or None.

    N = free + busy agents able to take the queue, A = the median of recent handle times.
    The first `free_agents` callers are answered at once. The others are served in waves of
    N: the first wave as the busy agents finish their current calls, on average half a
    handle time from now (A/2); each later wave a whole A after the one before. So for
    k = position - free_agents > 0: wait = (ceil(k / N) - 1/2) * A.
    """
    if position < 1:
        raise ValueError(f"position starts at 1 (next in line), got {position}")
    if free_agents < 0 or busy_agents < 0:
        raise ValueError("agent counts are >= 0")
    agents = free_agents + busy_agents
    if agents == 0 or not handle_times:
        return None
    if free_agents >= position:
        return 0.0
    typical = typical_handle_time(handle_times)
    waves = math.ceil((position - free_agents) / agents)
    return (waves - 0.5) * typical


def typical_handle_time(handle_times: Sequence[float]) -> float:
    """The median: one 40-minute escalation among ten 5-minute calls moves it not at all,
    where it would add 3.5 minutes to a mean (and a trimmed mean trims nothing off a sample
    this small)."""
    return float(median(handle_times))


@dataclass(frozen=True)
class _Handled:
    ended_at: datetime
    seconds: float


class HandleTimes:
    """Recent handle times (talk + hold + wrap) per queue: the last `keep` calls that ended
    within `within` of now. Fed with the voice activities of the event log: `call.answered`
    names the queue, the `call.ended` of the same call_sid gives the durations. A call that
    ended without being answered (an IVR hang-up) is no handled call and is not counted."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime],
        keep: int = DEFAULT_KEEP,
        within: timedelta = DEFAULT_WITHIN,
    ) -> None:
        if keep < 1:
            raise ValueError("keep at least one call")
        self._clock = clock
        self._keep = keep
        self._within = within
        self._answered: dict[str, str] = {}  # call_sid -> queue, until the call ends
        self._by_queue: dict[str, deque[_Handled]] = {}
        self._all: deque[_Handled] = deque(maxlen=keep)

    def __getstate__(self) -> dict[str, Any]:
        # what the log taught it, without the clock: that is the process's own (`use_clock`)
        return {k: v for k, v in vars(self).items() if k != "_clock"}

    def use_clock(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock

    def record(self, activity: str, data: Mapping[str, Any], at: datetime) -> None:
        """One `Conversation.ActivityRecorded` (`activity`, `data`, `at`); others are ignored."""
        call_sid = data.get("call_sid")
        if not isinstance(call_sid, str):
            return
        if activity == "call.answered":
            self.answered(call_sid, str(data.get("queue") or ""))
        elif activity == "call.ended":
            seconds = sum(_seconds(data.get(k)) for k in ("talk_seconds", "hold_seconds"))
            self.ended(call_sid, seconds + _seconds(data.get("wrap_seconds")), at)
        elif activity == "call.abandoned":
            self._answered.pop(call_sid, None)

    def answered(self, call_sid: str, queue: str) -> None:
        self._answered[call_sid] = queue
        if len(self._answered) > _MAX_OPEN_CALLS:
            del self._answered[next(iter(self._answered))]  # the oldest

    def ended(self, call_sid: str, handle_seconds: float, at: datetime) -> None:
        queue = self._answered.pop(call_sid, None)
        # zero seconds is a record of nothing handled: it would only drag the median down
        if queue is None or not handle_seconds > 0:
            return
        handled = _Handled(at, float(handle_seconds))
        self._by_queue.setdefault(queue, deque(maxlen=self._keep)).append(handled)
        self._all.append(handled)

    def recent(self, queue: str, now: datetime | None = None) -> list[float]:
        """The queue's recent handle times, else all queues' recent ones; [] when none."""
        since = (now or self._clock()) - self._within
        own = self._by_queue.get(queue, ())
        times = [h.seconds for h in own if h.ended_at >= since]
        if times:
            return times
        return [h.seconds for h in self._all if h.ended_at >= since]


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return 0.0


__all__ = ["HandleTimes", "estimate_wait", "typical_handle_time"]
