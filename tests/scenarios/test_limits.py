"""Scenario: a listener's limits, enforced by a real daemon over TCP.

Message size (RFC 1870: at MAIL SIZE= and after the data), command line
length, idle and DATA timeouts (the listener sweeps once a second, so a
timeout fires between its value and one second later), and the connection
limits in total and per client IP (loopback sources 127.0.0.x are distinct
client addresses), and a client that pipelines without ever reading its
replies (reading must pause instead of buffering replies without bound, and
an idle timeout must still free its slot). Expected replies come from
mta.model.replies; the size refusal is also checked in the Rejection log records.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from mta.model.replies import REPLIES, reply

HOST = "mx.test.example"   # conftest's [server] hostname


class Client:
    """A raw SMTP client: send bytes, read whole replies, see EOF."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (all its lines), or b"" on EOF."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    assert not out and not self.buf, f"EOF inside a reply: {out + self.buf!r}"
                    return b""
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            if line[3:4] != b"-":
                return out

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]


def ehlo(c: Client) -> bytes:
    c.reply()                      # greeting
    c.send(b"EHLO client.example\r\n")
    return c.reply()


@pytest.fixture
def sized(daemon_factory):
    d = daemon_factory(listener='max_message_size = "10KiB"\nmax_line_length = 512\n')
    c = Client(d.port)
    yield d, c
    c.close()


def test_size_advertised_and_refused_at_mail(sized):
    d, c = sized
    caps = ehlo(c)
    assert b"250-SIZE 10240\r\n" in caps, f"EHLO: got {caps!r}, want SIZE 10240"
    c.send(b"MAIL FROM:<s@example.org> SIZE=20000\r\nMAIL FROM:<s@example.org> SIZE=10240\r\n")
    got = c.replies(2)
    want = [reply("SIZE_TOO_BIG"), reply("SENDER_OK")]
    assert got == want, f"got {got}, want {want}"


@pytest.mark.parametrize("size, refused", [
    pytest.param(11 * 1024, True, id="over the limit"),
    pytest.param(200 * 1024, True, id="far over the limit"),
    pytest.param(9 * 1024, False, id="under the limit"),
])
def test_data_size_limit(sized, size, refused):
    d, c = sized
    ehlo(c)
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (size // len(line))
    c.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    c.replies(3)
    c.send(body)
    c.sock.settimeout(0.3)
    try:   # RFC 1870 6.1: nothing is answered before the end of the data
        early = c.sock.recv(100)
    except socket.timeout:
        early = None
    assert early is None, f"reply before end of data: got {early!r}, want none"
    c.sock.settimeout(10)
    c.send(b".\r\n")
    got = c.reply()
    if refused:
        assert got == reply("SIZE_TOO_BIG"), f"got {got!r}, want {reply('SIZE_TOO_BIG')!r}"
    else:
        assert got.startswith(b"250 2.0.0 Ok: queued as "), f"got {got!r}, want 250 queued"
    # the session goes on: a small message on the same connection is accepted
    c.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\nsmall\r\n.\r\n")
    got = c.replies(4)
    assert got[-1].startswith(b"250 2.0.0 Ok: queued as "), f"next message: got {got}"
    c.send(b"QUIT\r\n")
    assert c.reply() == reply("BYE")
    assert d.stop() == 0
    assert len(d.spooled().messages) == (1 if refused else 2), "spooled message count"
    rej = [(r["code"], r["status"], r["reason"], r["recipients"])
           for r in d.log_records("Rejection")]
    want = [(552, "5.3.4", "size_too_big", ["r@example.net"])] if refused else []
    assert rej == want, f"Rejection records: got {rej}, want {want}"


@pytest.mark.parametrize("data, want_first", [
    pytest.param(b"NOOP " + b"x" * 505 + b"\r\n", "OK", id="exactly 512 with CRLF"),
    pytest.param(b"NOOP " + b"x" * 506 + b"\r\n", "LINE_TOO_LONG", id="513 octets"),
    pytest.param(b"MAIL FROM:<" + b"a" * 600 + b"@example.org>\r\n", "LINE_TOO_LONG",
                 id="long MAIL is not run"),
    pytest.param(b"x" * (1 << 20) + b"\r\n", "LINE_TOO_LONG", id="1 MiB line answered once"),
])
def test_line_too_long(sized, data, want_first):
    _, c = sized
    ehlo(c)
    c.send(data + b"NOOP\r\n")
    got = c.replies(2)
    want = [reply(want_first), reply("OK")]
    assert got == want, f"got {got}, want {want}"
    c.send(b"QUIT\r\n")   # nothing else was queued: the next reply is the 221
    assert c.reply() == reply("BYE"), "extra replies after the long line"


# --- timeouts ---------------------------------------------------------------------------------

@pytest.fixture
def timed(daemon_factory):
    return daemon_factory(listener='idle_timeout = "1s"\ndata_timeout = "2s"\n')


def wait_close(c: Client) -> tuple[bytes, float]:
    """Read until EOF -> (everything read, seconds it took)."""
    start, out = time.monotonic(), b""
    while True:
        data = c.sock.recv(4096)
        if not data:
            return out, time.monotonic() - start
        out += data


def test_idle_timeout(timed):
    c = Client(timed.port)
    ehlo(c)
    out, waited = wait_close(c)
    assert out == reply("TIMEOUT", HOST), f"got {out!r}, want {reply('TIMEOUT', HOST)!r}"
    assert 0.9 <= waited <= 3.0, f"closed after {waited:.2f}s, want 1-2s (idle_timeout 1s)"
    c.close()


def test_data_timeout_applies_inside_data(timed):
    c = Client(timed.port)
    ehlo(c)
    c.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    assert c.replies(3)[-1] == REPLIES["DATA_GO"].line()
    c.send(b"Subject: slow\r\n\r\npart one")
    time.sleep(1.6)   # longer than idle_timeout plus a sweep: inside DATA that is no timeout
    c.send(b" part two")
    c.sock.settimeout(0.2)
    try:
        early = c.sock.recv(100)
    except socket.timeout:
        early = None
    assert early is None, f"closed inside DATA after the idle timeout: got {early!r}"
    c.sock.settimeout(10)
    out, waited = wait_close(c)
    assert out == reply("TIMEOUT", HOST), f"got {out!r}, want {reply('TIMEOUT', HOST)!r}"
    assert 1.5 <= waited <= 3.5, f"closed {waited:.2f}s after the last octet, want 2-3s"
    c.close()
    assert timed.stop() == 0
    assert len(timed.spooled().messages) == 0, "an unfinished message was spooled"


# --- connection limits ---------------------------------------------------------------------------

def test_connection_limits(daemon_factory):
    d = daemon_factory(listener="max_connections = 2\nmax_connections_per_ip = 1\n")
    first = Client(d.port, "127.0.0.1")
    assert first.reply().startswith(b"220 "), "first connection not greeted"
    same_ip = Client(d.port, "127.0.0.1")
    out, _ = wait_close(same_ip)
    want = reply("TOO_MANY_FROM_IP", HOST)
    assert out == want, f"second from 127.0.0.1: got {out!r}, want {want!r}"
    second = Client(d.port, "127.0.0.2")
    assert second.reply().startswith(b"220 "), "connection from 127.0.0.2 not greeted"
    third = Client(d.port, "127.0.0.3")
    out, _ = wait_close(third)
    want = reply("TOO_MANY_CONNECTIONS", HOST)
    assert out == want, f"third connection: got {out!r}, want {want!r}"
    # a refused connection does not hold a slot, a closed one frees its slot
    first.send(b"QUIT\r\n")
    assert first.reply() == reply("BYE")
    first.close()
    deadline = time.monotonic() + 3
    while True:
        again = Client(d.port, "127.0.0.1")
        got = again.reply()
        again.close()
        if got.startswith(b"220 ") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got.startswith(b"220 "), f"slot not freed after QUIT: got {got!r}"
    for c in (same_ip, second, third):
        c.close()


# --- a client that never reads its replies ---------------------------------------------------

PAIR = b"MAIL FROM:<s@example.org>\r\nRSET\r\n"   # no error, no junk: never a limit


def flood_until_blocked(c: Client, seconds: float) -> tuple[int, bool, bytes]:
    """Pipeline MAIL/RSET pairs without reading any reply.

    Returns (bytes sent, whether the server stopped reading: one send blocked
    for 1 s, the unsent rest of the last batch of pairs)."""
    chunk = PAIR * 2048
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)   # less in flight
    c.sock.settimeout(1.0)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            n = c.sock.send(chunk)
        except socket.timeout:
            return sent, True, chunk
        sent += n
        chunk = chunk[n:] or PAIR * 2048
    return sent, False, chunk


def test_unread_replies_stop_reading(daemon_factory):
    """Replies the peer does not read must not pile up in memory: reading pauses."""
    d = daemon_factory()
    c = Client(d.port)
    ehlo(c)
    sent, blocked, rest = flood_until_blocked(c, 15.0)
    assert blocked, f"the server kept reading {sent} octets of unanswered commands"
    # once the client reads, reading resumes and every reply arrives, in order
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(wait_close(c)[0]))
    c.sock.settimeout(20)
    reader.start()
    c.send(rest + b"QUIT\r\n")
    reader.join(30)
    assert not reader.is_alive(), "the session never ended after QUIT"
    out = c.buf + received[0]
    pairs = (sent + len(rest)) // len(PAIR)
    got = (out.count(reply("SENDER_OK")), out.count(reply("RESET_OK")), out[-len(reply("BYE")):])
    want = (pairs, pairs, reply("BYE"))
    assert got == want, f"(Sender OK, Reset OK, last reply): got {got}, want {want}"
    c.close()


def test_idle_peer_that_never_reads_is_dropped(daemon_factory):
    """An idle timeout must free the slot even when the final 421 cannot be delivered."""
    d = daemon_factory(listener='idle_timeout = "1s"\nmax_connections_per_ip = 1\n')
    c = Client(d.port)
    ehlo(c)
    _, blocked, _ = flood_until_blocked(c, 15.0)
    assert blocked, "the server kept reading"
    deadline, got = time.monotonic() + 5, b""
    while time.monotonic() < deadline:
        other = Client(d.port)
        got = other.reply()
        other.close()
        if got.startswith(b"220 "):
            break
        time.sleep(0.2)
    assert got.startswith(b"220 "), f"slot still held by the stuck peer: got {got!r}"
    c.close()
