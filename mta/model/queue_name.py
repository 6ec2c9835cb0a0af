"""Scheduled queue names: `[class/]campaign:tenant@domain[#pool]` — the only code that knows the syntax.

KumoMTA's naming: the domain is always there; tenant and campaign are optional
(`tenant@domain`, `campaign:tenant@domain`, `campaign:@domain`). Domains are
lower-cased; tenant and campaign keep their case but may not contain ':',
'@', '/' or '#' (they come from message headers, so they are cleaned, not
trusted). A queue class other than the default is a `class/` prefix and a
pool other than the default a `#pool` suffix, so messages of one campaign in
two classes or pools wait in separate queues (their own rates and backlogs).
"""
from __future__ import annotations

from typing import NamedTuple


class QueueName(NamedTuple):
    campaign: str   # "" when none
    tenant: str     # "" when none
    domain: str     # recipient domain, lower case
    klass: str = ""  # queue class; "" = the default class
    pool: str = ""   # egress pool; "" = the default pool


def _clean(part: str | None) -> str:
    if not part:
        return ""
    return "".join(c for c in part if c not in ":@/#\r\n\t ")[:64]


def format_name(campaign: str | None, tenant: str | None, domain: str,
                klass: str = "", pool: str = "") -> str:
    campaign, tenant, domain = _clean(campaign), _clean(tenant), domain.lower()
    if campaign:
        name = f"{campaign}:{tenant}@{domain}"
    elif tenant:
        name = f"{tenant}@{domain}"
    else:
        name = domain
    if klass:
        name = f"{klass}/{name}"
    if pool:
        name = f"{name}#{pool}"
    return name


def parse_name(name: str) -> QueueName:
    campaign = tenant = klass = pool = ""
    rest = name
    if "#" in rest:
        rest, pool = rest.rsplit("#", 1)
    if "/" in rest:
        klass, rest = rest.split("/", 1)
    if "@" in rest:
        left, rest = rest.rsplit("@", 1)
        if ":" in left:
            campaign, tenant = left.split(":", 1)
        else:
            tenant = left
    if not rest:
        raise ValueError(f"queue name {name!r} has no domain")
    return QueueName(campaign, tenant, rest.lower(), klass, pool)
