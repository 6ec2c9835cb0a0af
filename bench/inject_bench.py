#!/usr/bin/env python3
"""Injection rate: POST /inject (HTTP) versus SMTP, same messages, same daemon, same run.

Starts one `mta serve` with delivery.hold = true (accept-only: nothing is delivered, so
only injection is measured) on loopback ports, then alternates rounds HTTP, SMTP, HTTP,
SMTP, ... (the machine is noisy): each round injects N messages of S bytes to R
recipients with C concurrent clients that keep their connections (aiohttp's client with
keep-alive for HTTP, an asyncio SMTP client doing one transaction after the other on its
connection for SMTP). Both answer only once the message is durable (250 / 200). Prints
each round, the medians and the ratio HTTP/SMTP.

    python3 bench/inject_bench.py                      # N=2000, S=2048, R=1, C=16, 3 rounds
    python3 bench/inject_bench.py -n 5000 -s 20000 -r 2 -c 32 --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message(size: int, i: int) -> bytes:
    head = (f"From: <bench@sender.test>\r\nTo: <rcpt@example.test>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <{i}.{time.time_ns()}@sender.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


class Smtp:
    """One kept SMTP connection: EHLO once, then MAIL/RCPT/DATA per message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer

    async def reply(self) -> bytes:
        while True:
            line = await self.r.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    async def cmd(self, text: bytes, want: bytes) -> None:
        self.w.write(text)
        got = await self.reply()
        if not got.startswith(want):
            raise RuntimeError(f"{text!r} -> {got!r}")

    @classmethod
    async def open(cls, port: int) -> Smtp:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = cls(r, w)
        await c.reply()
        await c.cmd(b"EHLO bench.test\r\n", b"250")
        return c

    async def send(self, rcpts: list[str], data: bytes) -> None:
        await self.cmd(b"MAIL FROM:<bench@sender.test>\r\n", b"250")
        for r in rcpts:
            await self.cmd(f"RCPT TO:<{r}>\r\n".encode(), b"250")
        await self.cmd(b"DATA\r\n", b"354")
        await self.cmd(data.replace(b"\r\n.", b"\r\n..") + b".\r\n", b"250")

    async def close(self) -> None:
        self.w.write(b"QUIT\r\n")
        self.w.close()


async def round_smtp(port: int, msgs: list[bytes], rcpts: list[str], conc: int) -> float:
    conns = [await Smtp.open(port) for _ in range(conc)]
    todo = iter(msgs)
    start = time.perf_counter()

    async def worker(c: Smtp) -> None:
        for data in todo:
            await c.send(rcpts, data)
    await asyncio.gather(*(worker(c) for c in conns))
    took = time.perf_counter() - start
    for c in conns:
        await c.close()
    return len(msgs) / took


async def round_http(port: int, token: str, msgs: list[bytes], rcpts: list[str],
                     conc: int) -> float:
    url = f"http://127.0.0.1:{port}/inject?from=bench@sender.test&" + \
        "&".join(f"to={r}" for r in rcpts)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "message/rfc822"}
    todo = iter(msgs)
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://127.0.0.1:{port}/health") as r:   # warm a connection
            await r.read()
        start = time.perf_counter()

        async def worker() -> None:
            for data in todo:
                async with session.post(url, data=data, headers=headers) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
        await asyncio.gather(*(worker() for _ in range(conc)))
        return len(msgs) / (time.perf_counter() - start)


def start_daemon(work: Path, smtp_port: int, admin_port: int) -> subprocess.Popen:
    (work / "mta.toml").write_text(
        f'[server]\nhostname = "bench.test"\n[spool]\ndirectory = "{work}/spool"\n'
        f'[log]\ndirectory = "{work}/log"\n[delivery]\nhold = true\n'
        f'[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\ninject_max_size = "64MiB"\n'
        f'[[listener]]\naddress = "127.0.0.1"\nport = {smtp_port}\n')
    with open(work / "daemon.err", "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c",
                                 str(work / "mta.toml")], cwd=work, stdout=subprocess.PIPE,
                                stderr=err, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = proc.stdout.readline()
    if not line.startswith(b"mta: ready"):
        proc.kill()
        proc.wait()
        err = (work / "daemon.err").read_text()[-2000:]
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(f"daemon did not start: {err}")
    return proc


async def main_async(args: argparse.Namespace, smtp_port: int, admin_port: int,
                     token: str) -> None:
    rcpts = [f"rcpt{i}@example.test" for i in range(args.recipients)]
    rates: dict[str, list[float]] = {"http": [], "smtp": []}
    for rnd in range(args.rounds):
        order = ("http", "smtp") if rnd % 2 == 0 else ("smtp", "http")
        for kind in order:
            msgs = [message(args.size, i) for i in range(args.messages)]
            if kind == "http":
                rate = await round_http(admin_port, token, msgs, rcpts, args.concurrency)
            else:
                rate = await round_smtp(smtp_port, msgs, rcpts, args.concurrency)
            rates[kind].append(rate)
            print(f"round {rnd + 1} {kind:4s}: {rate:8.0f} msg/s", flush=True)
    h, s = statistics.median(rates["http"]), statistics.median(rates["smtp"])
    print(f"median http {h:.0f} msg/s, smtp {s:.0f} msg/s, ratio http/smtp {h / s:.2f} "
          f"(n={args.messages}, size={args.size}, rcpts={args.recipients}, "
          f"concurrency={args.concurrency}, rounds={args.rounds})")
    print("RESULT " + orjson.dumps({"http": h, "smtp": s, "ratio": h / s}).decode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--messages", type=int, default=2000)
    ap.add_argument("-s", "--size", type=int, default=2048)
    ap.add_argument("-r", "--recipients", type=int, default=1)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mta-inject-bench-"))
    smtp_port, admin_port = free_port(), free_port()
    proc = start_daemon(work, smtp_port, admin_port)
    try:
        token = (work / "spool" / "admin.token").read_text().strip()
        asyncio.run(main_async(args, smtp_port, admin_port, token))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
