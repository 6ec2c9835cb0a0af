"""Crash safety: kill -9 the daemon while a loader sends; nothing acknowledged is lost.

The loader records the Message-ID of every message that got a 250. After the
SIGKILL the daemon is restarted (recovery scan) and stopped, and the spool
must hold every acknowledged message exactly once, byte-identical to what was
sent (after our Received header). Messages in flight at the kill may or may
not be there (the client never got a 250 for them), but never half-written.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import re
import threading
import time

import pytest

from mta.spool import records as rec
from mta.spool.recovery import segment_path

N_CLIENTS = 12


def _message(tag: str, size: int) -> bytes:
    body = b"".join(b"line %d of %s with some text to fill the message body\r\n" % (i, tag.encode())
                    for i in range(size // 60))
    return (f"From: loader@crash.example\r\nTo: r@crash.example\r\nMessage-ID: <{tag}@crash.example>\r\n"
            f"Subject: crash test {tag}\r\n\r\n").encode() + body


async def _client(port: int, cid: int, acked: dict, stop: threading.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError
                if line[3:4] != b"-":
                    return line

        await reply()
        writer.write(b"EHLO loader\r\n")
        await reply()
        n = 0
        while not stop.is_set():
            tag = f"c{cid}-m{n}-{random.randrange(1 << 30)}"
            msg = _message(tag, random.choice((600, 3000, 30000)))
            writer.write(b"MAIL FROM:<loader@crash.example>\r\nRCPT TO:<r@crash.example>\r\nDATA\r\n")
            for _ in range(3):
                await reply()
            writer.write(msg + b".\r\n")
            if (await reply()).startswith(b"250 "):
                acked[tag] = hashlib.sha256(msg).hexdigest()
            n += 1
    except (ConnectionError, OSError):
        return  # the daemon was killed under us: expected


def _load(port: int, acked: dict, stop: threading.Event) -> None:
    async def main() -> None:
        await asyncio.gather(*(_client(port, i, acked, stop) for i in range(N_CLIENTS)))
    asyncio.run(main())


def _spooled_messages(daemon) -> dict[str, list[str]]:
    """Message-ID tag -> sha256 of each stored copy of the message (after our trace header)."""
    found = daemon.spooled()
    out: dict[str, list[str]] = {}
    for msg_id, loc in found.messages.items():
        with open(segment_path(str(daemon.spool_dir), loc.segment), "rb") as f:
            f.seek(loc.offset)
            buf = f.read(loc.length)
        _, _, content_at = rec.parse_message(buf, 0, loc.length)
        content = buf[content_at:]
        assert content.startswith(b"Received: "), f"got {content[:40]!r}, want our Received header first"
        body = content[content.index(b"\r\nFrom: ") + 2:]
        tag = re.search(rb"Message-ID: <([^@]+)@", body).group(1).decode()
        out.setdefault(tag, []).append(hashlib.sha256(body).hexdigest())
    return out


@pytest.mark.parametrize("round_no", range(3))
def test_kill9_loses_nothing_acknowledged(daemon_factory, round_no):
    d = daemon_factory()
    acked: dict[str, str] = {}
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(d.port, acked, stop))
    loader.start()
    time.sleep(1.0 + 0.3 * round_no)
    before_kill = len(acked)
    d.kill()                      # SIGKILL while clients are mid-transaction
    stop.set()
    loader.join(30)
    assert before_kill > 50, f"got {before_kill} acknowledged messages before the kill, want a real load"
    d.start()                     # recovery scan on start
    assert d.stop() == 0
    stored = _spooled_messages(d)
    missing = [t for t in acked if t not in stored]
    assert not missing, f"got {len(missing)} acknowledged messages missing (e.g. {missing[:3]}), want 0"
    dupes = [t for t in acked if len(stored[t]) != 1]
    assert not dupes, f"got duplicates {dupes[:3]}, want each acknowledged message once"
    damaged = [t for t, digest in acked.items() if stored[t][0] != digest]
    assert not damaged, f"got {len(damaged)} altered messages, want byte-identical content"
    found = d.spooled()
    print(f"round {round_no}: {len(acked)} acknowledged, {len(stored)} stored, torn tails {len(found.torn)}")
    assert not found.corrupt, f"got corrupt records {found.corrupt}, want none (a kill only tears tails)"
