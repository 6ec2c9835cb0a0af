#!/usr/bin/env python3
"""A counting SMTP sink for the demo, tests and benchmarks (loopback only).

Accepts everything (or refuses recipients whose local part starts with
"reject", and defers those starting with "defer": scripted outcomes for
tests), counts messages and bytes, records each client's source address and
the peak of concurrent connections per source, and prints one JSON line of
statistics on SIGTERM/SIGINT or when --count messages have arrived; SIGUSR1
writes the statistics so far to --stats-file and goes on.

    python3 tools/sink.py 127.0.0.2:25 [127.0.0.3:25 ...] [--count N] [--stats-file F]
                          [--times] [--delay-ms N] [--stall]

--times records each message's arrival (unix time), source and first
recipient; --delay-ms answers the end of data that much later (a slow site);
--stall accepts connections and never greets (idle connections for the
connection-scale benchmark).

Speaks just enough ESMTP (PIPELINING, 8BITMIME, SMTPUTF8, SIZE) with no
CHUNKING; it is a peer for throughput, not a conformance reference.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
from collections import Counter


class Stats:
    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.bytes = 0
        self.connections = 0
        self.active: Counter[str] = Counter()      # source ip -> open connections now
        self.peak: Counter[str] = Counter()        # source ip -> most open at once
        self.by_source: Counter[str] = Counter()   # source ip -> messages
        self.open = 0                              # connections open now
        self.peak_open = 0                         # most open at once
        self.times: list[tuple[float, str, str]] | None = None   # (arrival, source, first rcpt)
        self.first = 0.0
        self.last = 0.0

    def as_dict(self) -> dict:
        span = self.last - self.first
        return {"messages": self.messages, "recipients": self.recipients, "bytes": self.bytes,
                "connections": self.connections, "per_s": round(self.messages / span, 1) if span > 0 else None,
                "sources": len(self.by_source), "by_source": dict(self.by_source),
                "peak_per_source": dict(self.peak), "open": self.open, "peak_open": self.peak_open,
                **({"times": [(round(t, 4), s, r) for t, s, r in self.times]}
                   if self.times is not None else {})}


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Stats,
                  done: asyncio.Event, args: argparse.Namespace) -> None:
    peer = writer.get_extra_info("peername")[0]
    stats.connections += 1
    stats.open += 1
    stats.peak_open = max(stats.peak_open, stats.open)
    stats.active[peer] += 1
    stats.peak[peer] = max(stats.peak[peer], stats.active[peer])
    rcpts = 0
    first_rcpt = ""
    count = args.count
    try:
        if args.stall:        # hold the connection, say nothing, until the client gives up
            await reader.read()
            return
        writer.write(b"220 sink.test ESMTP sink\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                             b"250 SIZE 104857600\r\n")
            elif verb == b"HELO":
                writer.write(b"250 sink.test\r\n")
            elif verb == b"MAIL":
                rcpts = 0
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                local = line[8:].strip(b" <").lower()
                if local.startswith(b"reject"):
                    writer.write(b"550 5.1.1 no such user (scripted)\r\n")
                elif local.startswith(b"defer"):
                    writer.write(b"451 4.2.0 try again later (scripted)\r\n")
                else:
                    if not rcpts:
                        first_rcpt = line[8:].strip(b" <>\r\n").decode("utf-8", "replace")
                    rcpts += 1
                    writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                if not rcpts:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                size = 0
                while True:
                    data = await reader.readline()
                    if not data or data == b".\r\n":
                        break
                    size += len(data)
                if not data:
                    return
                now = time.monotonic()
                stats.first = stats.first or now
                stats.last = now
                stats.messages += 1
                stats.recipients += rcpts
                stats.bytes += size
                stats.by_source[peer] += 1
                if stats.times is not None:
                    stats.times.append((time.time(), peer, first_rcpt))
                if args.delay_ms:
                    await asyncio.sleep(args.delay_ms / 1000)
                writer.write(b"250 2.0.0 ok: queued\r\n")
                if count and stats.messages >= count:
                    done.set()
            elif verb == b"RSET" or verb == b"NOOP":
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.1 not implemented\r\n")
            if reader._buffer:  # type: ignore[attr-defined]  # pipelined: answer the group at once
                continue
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        stats.active[peer] -= 1
        stats.open -= 1
        writer.close()


def _write_stats(stats: Stats, path: str | None) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps(stats.as_dict()) + "\n")
        import os
        os.replace(path + ".tmp", path)   # readers never see half a file


async def main_async(args: argparse.Namespace) -> dict:
    stats = Stats()
    if args.times:
        stats.times = []
    done = asyncio.Event()
    servers = []
    for spec in args.listen:
        host, _, port = spec.rpartition(":")
        if not ipaddress.ip_address(host.strip("[]")).is_loopback:
            sys.exit(f"sink: {host} is not a loopback address")
        servers.append(await asyncio.start_server(
            lambda r, w: session(r, w, stats, done, args), host.strip("[]"), int(port),
            reuse_address=True, backlog=4096))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGUSR1, _write_stats, stats, args.stats_file)
    print(json.dumps({"ready": args.listen}), flush=True)
    await done.wait()
    for s in servers:
        s.close()
    return stats.as_dict()


def main() -> int:
    import resource   # thousands of connections: soft open-files limit up to the hard one
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("listen", nargs="+", help="HOST:PORT on loopback")
    ap.add_argument("--count", type=int, default=0, help="exit after this many messages")
    ap.add_argument("--stats-file", help="also write the final statistics here (and on SIGUSR1)")
    ap.add_argument("--times", action="store_true", help="record each message's arrival time")
    ap.add_argument("--delay-ms", type=float, default=0, help="delay before the 250 to the data")
    ap.add_argument("--stall", action="store_true", help="accept connections, never greet")
    args = ap.parse_args()
    try:
        import uvloop
        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    line = json.dumps(result)
    print(line, flush=True)
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
