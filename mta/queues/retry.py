"""Retry policy: jittered exponential backoff up to a maximum, then expiry at max age.

interval(n) = min(retry_max, retry_initial * 2**(n-1)) * uniform(0.8, 1.2): the jitter
spreads retries of a large deferred batch so they do not return as one wave.
"""
from __future__ import annotations

import random


class RetryPolicy:
    def __init__(self, initial: float, maximum: float, max_age: float):
        self.initial = initial
        self.maximum = maximum
        self.max_age = max_age

    def next_due(self, attempts: int, received: float, now: float) -> float | None:
        """When to try again after `attempts` failed attempts; None = expired."""
        expires = received + self.max_age
        if now >= expires:
            return None
        delay = min(self.maximum, self.initial * (2 ** max(0, attempts - 1)))
        delay *= random.uniform(0.8, 1.2)
        return min(now + delay, expires)   # the last attempt falls on the expiry time
