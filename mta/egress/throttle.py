"""Rates ("600/m") and the token bucket that holds a sender to one.

The delivery engine keeps one `Throttle` per (source, site) for each of
max_message_rate and max_connection_rate (and one per site for the site-wide
rate). Before sending a message or opening a connection it calls
`delay(now)`: 0 means go (a token was taken), otherwise it waits that many
seconds and asks again. The clock is the caller's, so tests run on fake time.

Reads and writes nothing. Diagnostics: `parse_rate` raises
`mta.config.schema.Invalid` (the shaping loader adds the file and table).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mta.config.schema import Invalid, describe, parse_duration, render


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `per` seconds: "600/m" is Rate(600, 60)."""

    count: float
    per: float

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        count = f"{self.count:g}"
        unit = _UNIT_NAMES.get(self.per)
        return f"{count}/{unit}" if unit else f"{count}/{self.per:g}s"


_UNIT_NAMES = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}
# Long unit names operators write (KumoMTA accepts "100/min", "10000/h"), mapped to
# the units parse_duration knows, so the denominator goes through that one parser.
_UNIT_ALIASES = {"sec": "s", "second": "s", "seconds": "s", "min": "m", "minute": "m",
                 "minutes": "m", "hr": "h", "hour": "h", "hours": "h", "day": "d",
                 "days": "d"}
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*", re.ASCII)
RATE_HELP = ('a string "COUNT/UNIT" with UNIT s, m, h or d (or sec, min, hour, day), '
             'optionally with a number: "10/s", "600/m", "5000/h", "100/5m"; '
             'or "unlimited"')


def parse_rate(value: object, base: Path = Path()) -> Rate | None:
    """A Rate from "10/s", "600/m", "100/5m", "5000/hour"; None for "unlimited".

    A Rate passes through unchanged, so the [delivery] defaults may hold either form.
    """
    if value is None or isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise Invalid(f"expected a rate ({RATE_HELP}), got {describe(value)}")
    if value.strip() == "unlimited":
        return None
    m = _RATE_RE.fullmatch(value.lower())
    if m is None:
        raise Invalid(f"{render(value)} is not a rate ({RATE_HELP})")
    unit = _UNIT_ALIASES.get(m[3], m[3])
    try:
        per = parse_duration(f"{m[2] or '1'}{unit}")
    except Invalid:
        raise Invalid(f"{render(value)} is not a rate: unknown unit {render(m[3])} "
                      f"({RATE_HELP})") from None
    count = float(m[1])
    if not count > 0 or not per > 0 or math.isinf(count):
        raise Invalid(f"{render(value)} is not a rate: count and period must be above 0 "
                      "(write \"unlimited\" for no limit)")
    return Rate(count, per)


class Throttle:
    """Token bucket: `rate.per_second` tokens a second, holding at most `burst`.

    The default burst is one second's worth of tokens (at least one), so an idle
    path may send a short burst but no more; over any window of T seconds at
    most burst + rate * T events pass. A bigger burst lets a path catch up
    after a pause, at the price of exceeding the rate over short windows.
    """

    __slots__ = ("rate", "burst", "_per_second", "_tokens", "_last")

    def __init__(self, rate: Rate, burst: float | None = None) -> None:
        if not rate.per_second > 0:
            raise ValueError(f"rate {rate} must be above 0")
        if burst is None:
            burst = max(1.0, rate.per_second)
        if not burst >= 1:
            raise ValueError(f"burst {burst} must be at least 1 (one event)")
        self.rate = rate
        self.burst = float(burst)
        self._per_second = rate.per_second
        self._tokens = self.burst            # a new path starts with a full bucket
        self._last: float | None = None      # clock time of the last refill

    def delay(self, now: float) -> float:
        """0.0 if a token is available (it is taken); else seconds until one is."""
        last = self._last
        # A clock that steps back refills nothing rather than draining the bucket.
        if last is not None and now > last:
            self._tokens = min(self.burst, self._tokens + (now - last) * self._per_second)
        if last is None or now > last:
            self._last = now
        # 1e-9: after waiting exactly the delay returned, float rounding may leave
        # 0.9999999999 tokens; without the slack the caller would spin on tiny delays.
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._per_second
