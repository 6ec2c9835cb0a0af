"""Outbound TCP connections bound to an egress source address.

Where it sits: SmtpClient.connect() (client.py) calls open_socket() for each
new session; the dispatcher has already chosen the egress source and the
destination (an IP address: MX resolution is egress/sites.py's job).

Why IP_BIND_ADDRESS_NO_PORT: binding to (source_ip, 0) before connect()
normally reserves an ephemeral port at bind() time, for every possible
destination, so a source IP runs out of ports after ~28k connections in
total. With the option (Linux 4.2+) the port is chosen at connect() time
from the full 4-tuple, so each source IP can hold ~28k connections *per
destination*, which thousands of sources and tens of thousands of
connections need.

Reads/writes: one non-blocking socket, handed to the caller connected.
Diagnostics: ConnectError (an OSError, errno kept) naming destination and
source, for a source that cannot be bound (EADDRNOTAVAIL: the IP is not on
this host), a refused or unreachable destination, or a timeout; ValueError
for an address that is not an IP literal (a caller bug).
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket

# Linux <netinet/in.h>; Python exposes the name only on some builds.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class ConnectError(OSError):
    """A TCP connection to a destination could not be made."""


def endpoint(address: str, port: int) -> str:
    """"host:port" for messages, with IPv6 in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def open_socket(address: str, port: int, *, source: str | None,
                      timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to address:port from `source`."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    if source is not None and ipaddress.ip_address(source).version != \
            ipaddress.ip_address(address).version:
        raise ValueError(f"source {source} and destination {address} differ in IP version")
    dest = endpoint(address, port)
    origin = f" from {source}" if source else ""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock.bind((source, 0))
            except OSError as e:
                raise ConnectError(e.errno, f"cannot bind source address {source} "
                                            f"for {dest}: {e.strerror}") from e
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (address, port))
        except TimeoutError as e:
            raise ConnectError(errno.ETIMEDOUT, f"connect to {dest}{origin}: "
                                                f"timed out after {timeout:g}s") from e
        except OSError as e:
            # asyncio puts "Connect call failed" in strerror: name the errno
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise ConnectError(e.errno, f"connect to {dest}{origin}: {reason}") from e
    except BaseException:
        sock.close()
        raise
    return sock
