"""Is a client address inside a set of networks (relay_cidrs, trusted FBL sources)?

One rule for every place that asks: an IPv4-mapped IPv6 address (::ffff:a.b.c.d, what a
dual-stack socket reports for an IPv4 peer) counts as its IPv4 address, and an IPv6
zone ("%eth0") is ignored. An address that does not parse is in no network.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def contains(networks: Iterable[Network], address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)
