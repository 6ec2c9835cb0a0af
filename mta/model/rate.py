"""Rate: so many events per period ("600/m"), the unit every rate limit is given in.

Parsed from TOML by mta.config.values.parse_rate (the config, the shaping files); held
in egress Limits and queue classes; enforced by mta.egress.throttle.Throttle. A value
only: no parsing, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

# Periods that have a unit name, for str(): 60.0 -> "m".
_UNIT_NAMES = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `per` seconds: "600/m" is Rate(600, 60)."""

    count: float    # events allowed in one period
    per: float      # the period, in seconds

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        count = f"{self.count:g}"
        unit = _UNIT_NAMES.get(self.per)
        return f"{count}/{unit}" if unit else f"{count}/{self.per:g}s"
