"""`mta demo`: the README's main job.

Starts the daemon (`mta serve` on the built-in default config, in a child
process), injects a batch of messages over SMTP from concurrent pipelining
clients with a progress bar, stops the daemon, and shows the batch in the
spool with an offline scan, plus a summary: accepted, messages/s, accept
latency (end of data -> 250) p50/p99, and messages per fsync.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from mta.config import load_config
from mta.spool.recovery import scan


def _message(i: int, size: int) -> bytes:
    head = (f"From: demo@sender.example\r\nTo: user{i}@example.com\r\n"
            f"Subject: demo message {i}\r\nMessage-ID: <demo-{i}@sender.example>\r\n"
            "X-Campaign: demo\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _client(host: str, port: int, todo: list[int], size: int, lat: list[float],
                  progress: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    await _reply(reader)
    writer.write(b"EHLO demo.client\r\n")
    await _reply(reader)
    while todo:
        i = todo.pop()
        writer.write(b"MAIL FROM:<demo@sender.example>\r\nRCPT TO:<user%d@example.com>\r\nDATA\r\n" % i)
        for _ in range(3):
            r = await _reply(reader)
            if r[:1] not in b"23":
                raise RuntimeError(f"refused: {r!r}")
        writer.write(_message(i, size) + b".\r\n")
        t0 = time.perf_counter()
        r = await _reply(reader)
        lat.append(time.perf_counter() - t0)
        if r[:3] != b"250":
            raise RuntimeError(f"message {i} refused: {r!r}")
        progress[0] += 1
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()


async def _inject(host: str, port: int, count: int, size: int, concurrency: int) -> tuple[float, list[float]]:
    todo = list(range(count))
    lat: list[float] = []
    progress = [0]
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(_client(host, port, todo, size, lat, progress))
             for _ in range(min(concurrency, count))]
    while not all(t.done() for t in tasks):
        done = progress[0]
        bar = "#" * (40 * done // count)
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"\r  injecting [{bar:<40}] {done}/{count} {rate:7.0f} msg/s", end="", file=sys.stderr, flush=True)
        await asyncio.sleep(0.1)
    for t in tasks:
        t.result()
    elapsed = time.perf_counter() - t0
    print(f"\r  injecting [{'#' * 40}] {count}/{count} {count / elapsed:7.0f} msg/s", file=sys.stderr)
    return elapsed, lat


def run_demo(count: int = 2000, size: int = 2048, concurrency: int = 20) -> int:
    cfg = load_config(None)
    host, port = cfg.listener[0].address, cfg.listener[0].port
    before = len(scan(str(cfg.spool.directory)).messages) if cfg.spool.directory.exists() else 0
    print(f"mta demo: starting the daemon on {host}:{port}, spool {cfg.spool.directory}")
    proc = subprocess.Popen([sys.executable, "-m", "mta", "serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))
    assert proc.stdout is not None
    ready = proc.stdout.readline().decode().strip()
    if not ready.startswith("mta: ready"):
        proc.kill()
        print(f"mta demo: the daemon did not start ({ready or 'no output'}); is {host}:{port} free?",
              file=sys.stderr)
        return 1
    print(f"  {ready}")
    try:
        elapsed, lat = asyncio.run(_inject(host, port, count, size, concurrency))
    finally:
        proc.send_signal(signal.SIGTERM)
        tail = proc.communicate(timeout=60)[0].decode()
    stats = next((line for line in tail.splitlines() if line.startswith("mta: spool")), "")
    found = scan(str(cfg.spool.directory))
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(f"  daemon stopped; {stats[5:] if stats else 'no spool statistics'}")
    print(f"  spool after restart scan: {len(found.messages)} messages ({len(found.messages) - before} new) "
          f"in {len(found.segments)} segment(s), {len(found.corrupt)} corrupt")
    print(f"summary: accepted {len(lat)}/{count} messages of {size} bytes over {concurrency} connections "
          f"in {elapsed:.2f} s = {len(lat) / elapsed:.0f} msg/s; accept latency p50 {p(0.5):.2f} ms, "
          f"p99 {p(0.99):.2f} ms (every 250 after fdatasync)")
    return 0 if len(found.messages) - before >= len(lat) == count else 1
