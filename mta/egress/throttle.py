"""The token bucket that holds a sender to a Rate ("600/m").

The delivery engine keeps one `Throttle` per (source, site) for each of
max_message_rate and max_connection_rate (and one per site for the site-wide
rate). Before sending a message or opening a connection it calls
`delay(now)`: 0 means go (a token was taken), otherwise it waits that many
seconds and asks again. The clock is the caller's, so tests run on fake time.

Rate is a value of mta/model/rate.py, parsed by mta/config/values.py (the config and
the shaping files). Reads and writes nothing; raises ValueError only for a bad
argument from the caller.
"""
from __future__ import annotations

from mta.model.rate import Rate

__all__ = ["Throttle"]


class Throttle:
    """Token bucket: `rate.per_second` tokens a second, holding at most `burst`.

    The default burst is one second's worth of tokens (at least one), so an idle
    path may send a short burst but no more; over any window of T seconds at
    most burst + rate * T events pass. A bigger burst lets a path catch up
    after a pause, at the price of exceeding the rate over short windows.
    """

    __slots__ = ("_last", "_own_burst", "_per_second", "_tokens", "burst", "rate")

    def __init__(self, rate: Rate, burst: float | None = None) -> None:
        if not rate.per_second > 0:
            raise ValueError(f"rate {rate} must be above 0")
        self._own_burst = burst is None      # the burst follows the rate (set_rate)
        if burst is None:
            burst = max(1.0, rate.per_second)
        if not burst >= 1:
            raise ValueError(f"burst {burst} must be at least 1 (one event)")
        self.rate = rate
        self.burst = float(burst)
        self._per_second = rate.per_second
        self._tokens = self.burst            # a new path starts with a full bucket
        self._last: float | None = None      # clock time of the last refill

    def set_rate(self, rate: Rate, now: float) -> None:
        """Go on at `rate` (a live shaping change, mta/egress/limits.py): the tokens
        earned until `now` at the old rate are kept, capped at the new burst, so a
        change neither hands out a fresh burst nor takes back what was earned."""
        if not rate.per_second > 0:
            raise ValueError(f"rate {rate} must be above 0")
        self._refill(now)
        self.rate = rate
        self._per_second = rate.per_second
        if self._own_burst:
            self.burst = max(1.0, rate.per_second)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        last = self._last
        # A clock that steps back refills nothing rather than draining the bucket.
        if last is not None and now > last:
            self._tokens = min(self.burst, self._tokens + (now - last) * self._per_second)
        if last is None or now > last:
            self._last = now

    def delay(self, now: float) -> float:
        """0.0 if a token is available (it is taken); else seconds until one is."""
        self._refill(now)
        # 1e-9: after waiting exactly the delay returned, float rounding may leave
        # 0.9999999999 tokens; without the slack the caller would spin on tiny delays.
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._per_second
