"""Scheduled queue names: `campaign:tenant@domain` — the only code that knows the syntax.

KumoMTA's naming: the domain is always there; tenant and campaign are optional
(`tenant@domain`, `campaign:tenant@domain`, `campaign:@domain`). Domains are
lower-cased; tenant and campaign keep their case but may not contain ':' or
'@' (they come from message headers, so they are cleaned, not trusted).
"""
from __future__ import annotations

from typing import NamedTuple


class QueueName(NamedTuple):
    campaign: str   # "" when none
    tenant: str     # "" when none
    domain: str     # recipient domain, lower case


def _clean(part: str | None) -> str:
    if not part:
        return ""
    return "".join(c for c in part if c not in ":@\r\n\t ")[:64]


def format_name(campaign: str | None, tenant: str | None, domain: str) -> str:
    campaign, tenant, domain = _clean(campaign), _clean(tenant), domain.lower()
    if campaign:
        return f"{campaign}:{tenant}@{domain}"
    if tenant:
        return f"{tenant}@{domain}"
    return domain


def parse_name(name: str) -> QueueName:
    campaign = tenant = ""
    rest = name
    if "@" in rest:
        left, rest = rest.rsplit("@", 1)
        if ":" in left:
            campaign, tenant = left.split(":", 1)
        else:
            tenant = left
    if not rest:
        raise ValueError(f"queue name {name!r} has no domain")
    return QueueName(campaign, tenant, rest.lower())
