"""The DATA memory governor against a real daemon: a client holding the budget makes new
transactions wait with 452 4.3.1, and a flood of slow clients each sending a large DATA
slowly leaves the daemon's peak RSS under budget + a fixed overhead while a normal client
still gets an answer (250, or a 4xx; never a hang)."""
from __future__ import annotations

import asyncio
import smtplib
import socket
import time


MIB = 1 << 20


def _memory_daemon(daemon_factory, budget: str, wait: str, listener: str = ""):
    d = daemon_factory(listener=listener, start=False)
    text = d.config.read_text().replace("[spool]\n", "[spool]\nhot_cache = 0\n", 1)
    d.config.write_text(text.replace(
        "[server]\n", f'[server]\ndata_memory_budget = "{budget}"\ndata_memory_wait = "{wait}"\n', 1))
    return d.start()


def _status(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_at_the_budget_mail_gets_452_and_the_holder_still_finishes(daemon_factory):
    d = _memory_daemon(daemon_factory, "1MiB", "30s")
    holder = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    _reply(holder)
    for cmd in (b"EHLO big\r\n", b"MAIL FROM:<a@sender.test>\r\n", b"RCPT TO:<r@example.test>\r\n",
                b"DATA\r\n"):
        holder.sendall(cmd)
        assert _reply(holder)[:1] in b"23"
    line = b"x" * 78 + b"\r\n"
    holder.sendall(b"Subject: big\r\n\r\n" + line * (MIB * 5 // 4 // len(line)))
    time.sleep(0.5)                              # the daemon holds 1.25 MiB: full
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
        s.ehlo()
        code, text = s.mail("b@sender.test")
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
    holder.sendall(b".\r\n")                     # the oldest holder may always finish
    assert _reply(holder).startswith(b"250 2.0.0")
    holder.close()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
        assert s.sendmail("b@sender.test", ["r@example.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
    time.sleep(0.5)                              # the log is written every 0.2 s
    rej = [r for r in d.log_records("Rejection") if r["reason"] == "memory_full"]
    assert rej and rej[0]["code"] == 452


async def _slow_client(port: int, size: int, chunk: bytes, pause: float, out: list) -> None:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        for cmd in (b"HELO slow\r\n", b"MAIL FROM:<s@sender.test>\r\n",
                    b"RCPT TO:<r@example.test>\r\n", b"DATA\r\n"):
            w.write(cmd)
            line = await r.readline()
            if line[:1] not in b"23":
                out.append(line[:3])
                w.close()
                return
        sent = 0
        while sent < size:
            w.write(chunk)
            await w.drain()                      # blocks while the daemon does not read
            sent += len(chunk)
            await asyncio.sleep(pause)
        w.write(b".\r\n")
        line = await asyncio.wait_for(r.readline(), 120)
        out.append(line[:3] or b"closed")
        w.close()
    except (OSError, asyncio.IncompleteReadError):
        out.append(b"reset")


def test_slow_client_flood_keeps_rss_under_the_budget(daemon_factory):
    budget = 8 * MIB
    d = _memory_daemon(daemon_factory, "8MiB", "2s",
                       listener="max_connections_per_ip = 1000\ndata_timeout = \"2m\"\n")
    pid = d.proc.pid
    time.sleep(0.5)
    base = _status(pid, "VmRSS")
    clients, size = 300, 384 << 10             # 300 x 384 KiB = 112 MiB wanted in memory
    chunk = (b"y" * 1022 + b"\r\n") * 8         # 8 KiB every 100 ms per client

    async def run():
        out: list[bytes] = []
        normal: list[str] = []

        async def normal_client():
            await asyncio.sleep(3)
            for _ in range(5):
                t0 = time.monotonic()
                try:
                    await asyncio.to_thread(_send_small, d.port)
                    normal.append("250")
                except smtplib.SMTPResponseException as exc:
                    normal.append(str(exc.smtp_code))
                assert time.monotonic() - t0 < 20, "a normal client never hangs"
                await asyncio.sleep(1)

        tasks = [asyncio.create_task(_slow_client(d.port, size, chunk, 0.1, out))
                 for _ in range(clients)]
        await asyncio.gather(normal_client(), *tasks)
        return out, normal

    out, normal = asyncio.run(run())
    peak = _status(pid, "VmHWM")
    overhead = 48 * MIB                          # 300 sessions, read buffers, allocator slack
    print(f"flood: base RSS {base / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
          f"budget {budget / MIB:.0f} MiB; replies {sorted(set(out))}; normal {normal}")
    assert peak - base < budget + overhead, f"peak RSS grew {(peak - base) / MIB:.1f} MiB"
    assert b"250" in out, "some of the flood gets through"
    assert normal and all(c == "250" or c.startswith("4") for c in normal), normal
    _send_small(d.port)                          # afterwards, mail flows again


def _send_small(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.sendmail("n@sender.test", ["r@example.test"], b"Subject: n\r\n\r\nhi\r\n")
