#!/usr/bin/env python3
"""The README's main job: the daemon relays a demo batch end to end, on loopback.

1. a real DNS server (unbound, tools/dnsserver.py) serves MX records for four
   demo domains on two sites, plus the senders' domain;
2. a counting SMTP sink (tools/sink.py) listens on 127.0.0.2:25 and 127.0.0.3:25;
3. `mta serve` runs on its built-in default config (127.0.0.1:2525, ./var),
   told only where the DNS server is (--dns);
4. 20 pipelining SMTP clients inject the batch (progress bar), about 1 in 100
   recipients is refused by the sink so bounces and DSNs show up too (on a second
   run those hard-bounced addresses are on the suppression list and refused at RCPT);
5. the demo waits until everything is delivered or bounced, then prints a
   summary: accepted, delivered, bounced, DSNs, msgs/s, latencies.

    bash tools/dev.sh demo          # or: .venv/bin/python tools/demo.py -n 5000 -s 51200
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


from dnsserver import DnsServer  # noqa: E402
from mta.config import load_config  # noqa: E402
from mta.control.client import admin_request  # noqa: E402

DOMAINS = ["gmail.demo", "example.demo", "yahoo.demo", "outlook.demo"]
ZONE = [
    "gmail.demo. 300 IN MX 10 mx1.sink.demo.", "example.demo. 300 IN MX 10 mx1.sink.demo.",
    "yahoo.demo. 300 IN MX 10 mx2.sink.demo.", "outlook.demo. 300 IN MX 10 mx2.sink.demo.",
    "sender.demo. 300 IN MX 10 mx1.sink.demo.",
    "mx1.sink.demo. 300 IN A 127.0.0.2", "mx2.sink.demo. 300 IN A 127.0.0.3",
]


def _message(i: int, size: int) -> tuple[str, bytes]:
    local = f"reject{i}" if i % 100 == 99 else f"user{i}"
    rcpt = f"{local}@{DOMAINS[i % len(DOMAINS)]}"
    head = (f"From: news@sender.demo\r\nTo: {rcpt}\r\nSubject: demo message {i}\r\n"
            f"Message-ID: <demo-{i}@sender.demo>\r\nX-Campaign: demo\r\nX-Tenant: acme\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return rcpt, head + line * max(1, (size - len(head)) // len(line))


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _client(host: str, port: int, todo: list[int], size: int, lat: list[float],
                  suppressed: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    await _reply(reader)
    writer.write(b"EHLO demo.client\r\n")
    await _reply(reader)
    while todo:
        rcpt, msg = _message(todo.pop(), size)
        writer.write(b"MAIL FROM:<news@sender.demo>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpt.encode())
        replies = [await _reply(reader) for _ in range(3)]
        if replies[1].startswith(b"550 5.7.1") and b"suppressed" in replies[1]:
            suppressed.append(rcpt)   # hard-bounced in an earlier run: on the suppression list
            writer.write(b"RSET\r\n")  # DATA was refused too (no valid recipient)
            await _reply(reader)
            continue
        for r in replies:
            if r[:1] not in b"23":
                raise RuntimeError(f"refused: {r!r}")
        writer.write(msg + b".\r\n")
        t0 = time.perf_counter()
        r = await _reply(reader)
        if r[:3] != b"250":
            raise RuntimeError(f"message refused: {r!r}")
        lat.append(time.perf_counter() - t0)
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()


def _bar(label: str, done: int, total: int, t0: float) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"\r  {label:<10} [{'#' * (40 * done // max(total, 1)):<40}] {done}/{total} {rate:7.0f} msg/s",
          end="", file=sys.stderr, flush=True)


async def _inject(host: str, port: int, count: int, size: int,
                  conc: int) -> tuple[float, list[float], list[str]]:
    todo, lat, suppressed = list(range(count))[::-1], [], []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(_client(host, port, todo, size, lat, suppressed))
             for _ in range(min(conc, count))]
    while not all(t.done() for t in tasks):
        _bar("injecting", len(lat) + len(suppressed), count, t0)
        await asyncio.sleep(0.1)
    for t in tasks:
        t.result()
    _bar("injecting", len(lat) + len(suppressed), count, t0)
    print(file=sys.stderr)
    return time.perf_counter() - t0, lat, suppressed


def _outcomes(cfg) -> dict:
    status, data = admin_request(cfg, "/queue/summary")   # address and token from the config
    assert status == 200, data
    return data["outcomes"]


def _wait_delivered(admin, count: int, t0: float, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = _outcomes(admin)
        finished = out["delivered"] + out["bounced"]
        _bar("delivering", min(finished, count), count, t0)
        if finished >= count or time.monotonic() > deadline:
            print(file=sys.stderr)
            return out
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--count", type=int, default=5000)
    ap.add_argument("-s", "--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("-C", "--concurrency", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: the sink listens on port 25 of 127.0.0.2/3: run as root")
    cfg = load_config(None)
    host, port = cfg.listener[0].address, cfg.listener[0].port
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs: list[subprocess.Popen] = []
    with DnsServer(ZONE) as dns:
        print(f"mta demo: DNS (unbound) on 127.0.0.1:{dns.port}; sink on 127.0.0.2:25 and 127.0.0.3:25")
        sink = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"), "127.0.0.2:25",
                                 "127.0.0.3:25"], stdout=subprocess.PIPE, env=env)
        procs.append(sink)
        assert sink.stdout is not None
        sink.stdout.readline()
        daemon = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--dns", f"127.0.0.1:{dns.port}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        procs.append(daemon)
        try:
            assert daemon.stdout is not None
            ready = daemon.stdout.readline().decode().strip()
            if not ready.startswith("mta: ready"):
                print(f"mta demo: the daemon did not start ({ready or 'no output'}); is {host}:{port} free?",
                      file=sys.stderr)
                return 1
            print(f"  {ready} (default config, spool {cfg.spool.directory})")
            before = _outcomes(cfg)
            t0 = time.perf_counter()
            inject_s, lat, suppressed = asyncio.run(
                _inject(host, port, args.count, args.size, args.concurrency))
            # reject* recipients the sink refuses (each also sends a DSN), unless our own
            # suppression list refused them at RCPT (they hard-bounced in an earlier run)
            refused = sum(1 for i in range(args.count) if i % 100 == 99) - len(suppressed)
            out = _wait_delivered(cfg, len(lat) + refused + before["delivered"]
                                  + before["bounced"], t0, timeout=300)
            total_s = time.perf_counter() - t0
        finally:
            daemon.send_signal(signal.SIGTERM)
            tail = daemon.communicate(timeout=60)[0].decode()
            sink.send_signal(signal.SIGTERM)
            sink_stats = json.loads(sink.communicate(timeout=30)[0].decode().strip().splitlines()[-1])
    spool_line = next((ln[5:] for ln in tail.splitlines() if ln.startswith("mta: spool")), "")
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    delivered = out["delivered"] - before["delivered"]
    bounced = out["bounced"] - before["bounced"]
    print(f"  daemon stopped; {spool_line}")
    print(f"summary: accepted {len(lat)}/{args.count} messages of {args.size} bytes in {inject_s:.2f} s "
          f"({len(lat) / inject_s:.0f} msg/s, every 250 after fdatasync; accept latency p50 {q(0.5):.2f} ms, "
          f"p99 {q(0.99):.2f} ms)")
    print(f"         delivered {delivered - refused} + {refused} DSNs, bounced {bounced} (refused by the "
          f"sink); the sink counted {sink_stats['messages']}; end to end {args.count / total_s:.0f} msg/s "
          f"({total_s:.2f} s from first connect to last delivery)")
    if suppressed:
        print(f"         refused at RCPT: {len(suppressed)} recipients on the suppression list "
              f"(hard-bounced in an earlier run; `mta suppress check {suppressed[0]}`)")
    ok = len(lat) + len(suppressed) == args.count and delivered + bounced >= len(lat) + refused
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
