"""Scenario: our SMTP client (mta.delivery.SmtpClient) against real receivers on loopback.

Peers: aiosmtpd as a scriptable receiver (refusals, deferrals, EHLO keywords
added or removed, STARTTLS with a certificate made here by openssl),
Postfix's smtp-sink (pipelining, DSN, its -r/-Q/-q soft failures, a dump of
what it received), our own `mta serve` listener (the only local peer that
offers CHUNKING, so the BDAT path), and tiny scripted asyncio servers for
broken peers (close after greeting, 421/554 greeting, a stall, a bad TLS
handshake). Each test runs on uvloop and on the stdlib loop; any unhandled
loop exception fails it. Everything binds to 127.0.0.0/8.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from aiosmtpd.controller import Controller
from conftest import free_port

from mta._native.wire import CLIENT_LOCAL_REPLIES
from mta.delivery import RemoteReply, SessionError, SmtpClient, Timeouts
from mta.delivery.connect import IP_BIND_ADDRESS_NO_PORT, open_socket
from mta.spool import records as rec

FAST = Timeouts(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5, data=5, body=5,
                end_of_data=5, quit=2)
CONTENT = (b"From: s@example.org\r\nTo: a@example.net\r\nSubject: client test\r\n\r\n"
           b".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n.\r\n\r\nend\r\n")
EIGHT_BIT = b"Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n"
DOT_PHASE = "sending end of data -- message may be sent more than once"
SMTP_SINK = "/usr/sbin/smtp-sink"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """run(async_fn) on a fresh loop of each kind, with a deadline; fails on
    any exception the loop reports but nobody handled."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(fn, timeout: float = 15):
        errors: list[dict] = []

        async def main():
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            async with asyncio.timeout(timeout):
                return await fn()
        with asyncio.Runner(loop_factory=factory) as r:
            result = r.run(main())
        assert not errors, f"unhandled loop exceptions: {errors}"
        return result
    return runner


async def connect(port: int, host: str = "127.0.0.1", **kw) -> SmtpClient:
    kw.setdefault("source", None)
    kw.setdefault("timeouts", FAST)
    return await SmtpClient.connect(host, port, ehlo_name="client.test.example", **kw)


@contextlib.asynccontextmanager
async def session(port: int, **kw):
    """A connected client that is always closed (QUIT, or abort mid-transaction)."""
    c = await connect(port, **kw)
    try:
        yield c
    finally:
        await c.quit()


def codes(result) -> tuple[list[int], int | None]:
    return [r.code for r in result.recipients], result.data and result.data.code


# -- aiosmtpd ------------------------------------------------------------------------

@dataclass
class Got:
    peer: tuple[str, int]       # client address as the receiver saw it
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]
    content: bytes              # unstuffed, as received
    tls: bool                   # received over TLS


class Handler:
    """aiosmtpd handler: records messages, answers as scripted."""

    def __init__(self, refuse: dict[str, str] | None = None, data_reply: str | None = None,
                 add: tuple[str, ...] = ("PIPELINING",), remove: tuple[str, ...] = ()):
        self.refuse = refuse or {}      # recipient -> reply
        self.data_reply = data_reply    # reply at end of data, None: 250
        self.add, self.remove = add, remove   # EHLO keywords to add and remove
        self.got: list[Got] = []
        self.mails = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname    # the 5-argument hook must do this itself
        out = [r for r in responses if r[4:].split(" ")[0] not in self.remove]
        return out[:-1] + [f"250-{kw}" for kw in self.add] + out[-1:]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.got.append(Got(tuple(session.peer[:2]), envelope.mail_from,
                            list(envelope.mail_options), list(envelope.rcpt_tos),
                            list(envelope.rcpt_options), envelope.original_content,
                            session.ssl is not None))
        return self.data_reply or "250 2.0.0 OK: queued"


@pytest.fixture
def aiosmtpd_server():
    """Start aiosmtpd receivers: make(handler, **SMTP options) -> port."""
    started: list[Controller] = []

    def make(handler: Handler, **options) -> int:
        c = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
        c.start()
        started.append(c)
        return c.port
    yield make
    for c in started:
        c.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for the receiver (openssl req)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=mx.test.example"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


RCPTS = [("a@example.net", None, None), ("b@example.net", None, None),
         ("c@example.net", None, None)]


def test_plain_delivery_byte_identical(run, aiosmtpd_server):
    h = Handler(add=())                 # no PIPELINING: one command at a time
    port = aiosmtpd_server(h)

    async def go():
        async with session(port) as c:
            assert "PIPELINING" not in c.capabilities and c.peer == ("127.0.0.1", port)
            r = await c.send("s@example.org", RCPTS[:1], CONTENT)
            return r
    r = run(go)
    assert codes(r) == ([250], 250) and r.phase == DOT_PHASE
    assert h.got[0].content == CONTENT, f"got {h.got[0].content!r}, want {CONTENT!r}"
    assert h.got[0].mail_options == [f"SIZE={len(CONTENT)}"]


def test_pipelining_with_refusals(run, aiosmtpd_server):
    h = Handler(refuse={"b@example.net": "550 5.1.1 No such user",
                        "c@example.net": "452 4.5.3 Too many recipients"})
    port = aiosmtpd_server(h)

    async def go():
        async with session(port) as c:
            assert "PIPELINING" in c.capabilities
            return await c.send("s@example.org", RCPTS, CONTENT)
    r = run(go)
    assert r.recipients == [RemoteReply(250, "2.1.5", "OK"),
                            RemoteReply(550, "5.1.1", "No such user"),
                            RemoteReply(452, "4.5.3", "Too many recipients")]
    assert r.data == RemoteReply(250, "2.0.0", "OK: queued")
    assert h.got[0].rcpt_tos == ["a@example.net"] and h.got[0].content == CONTENT


def test_all_refused_then_next_message(run, aiosmtpd_server):
    h = Handler(refuse={a: "550 5.1.1 No such user" for a, _, _ in RCPTS})
    port = aiosmtpd_server(h)

    async def go():
        async with session(port) as c:
            first = await c.send("s@example.org", RCPTS, CONTENT)
            assert c.reusable
            h.refuse.clear()
            second = await c.send("s@example.org", RCPTS[:1], CONTENT)
            return first, second
    first, second = run(go)
    assert codes(first) == ([550, 550, 550], None) and first.phase == "sending RCPT TO"
    assert codes(second) == ([250], 250) and len(h.got) == 1


def test_4xx_at_end_of_data_and_reuse(run, aiosmtpd_server):
    h = Handler(data_reply="451 4.7.1 Greylisted, try again later")
    port = aiosmtpd_server(h)

    async def go():
        async with session(port) as c:
            results = [await c.send("s@example.org", RCPTS[:1], CONTENT)]
            h.data_reply = None
            for _ in range(3):
                results.append(await c.send("s@example.org", RCPTS[:2], CONTENT))
            sent = c.messages_sent
            return results, sent
    results, sent = run(go)
    assert results[0].data == RemoteReply(451, "4.7.1", "Greylisted, try again later")
    assert [codes(r) for r in results[1:]] == [([250, 250], 250)] * 3
    assert sent == 3 and len({g.peer for g in h.got}) == 1, "all on one connection"


def test_8bit_to_server_without_8bitmime_is_not_sent(run, aiosmtpd_server):
    h = Handler()
    port = aiosmtpd_server(h, decode_data=True)     # aiosmtpd then offers no 8BITMIME

    async def go():
        async with session(port) as c:
            assert "8BITMIME" not in c.capabilities
            r = await c.send("s@example.org", RCPTS[:2], EIGHT_BIT, body_8bit=True)
            assert c.reusable
            return r
    r = run(go)
    want = RemoteReply(*CLIENT_LOCAL_REPLIES["NEED_8BITMIME"])
    assert r.recipients == [want, want] and r.data is None
    assert (want.code, want.status) == (554, "5.6.3") and h.mails == 0, "nothing was sent"


def test_8bit_with_8bitmime_and_smtputf8(run, aiosmtpd_server):
    h = Handler()
    port = aiosmtpd_server(h, enable_SMTPUTF8=True)

    async def go():
        async with session(port) as c:
            return await c.send("s@example.org", [("ü@example.net", None, None)], EIGHT_BIT,
                                smtputf8=True)
    r = run(go)
    assert codes(r) == ([250], 250)
    assert h.got[0].mail_options == [f"SIZE={len(EIGHT_BIT)}", "BODY=8BITMIME", "SMTPUTF8"]
    assert h.got[0].rcpt_tos == ["ü@example.net"] and h.got[0].content == EIGHT_BIT


def test_starttls(run, aiosmtpd_server, tls_files, caplog):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*tls_files)
    h = Handler()
    port = aiosmtpd_server(h, tls_context=server_ctx)

    async def go():
        async with session(port) as c:
            assert c.tls and "STARTTLS" not in c.capabilities, "EHLO again after TLS"
            r = await c.send("s@example.org", RCPTS[:1], CONTENT)
            return r
    with caplog.at_level("INFO", logger="mta.delivery"):
        r = run(go)
    assert codes(r) == ([250], 250) and h.got[0].tls and h.got[0].content == CONTENT
    assert "Untrusted TLS connection" in caplog.text


def test_source_binding(run, aiosmtpd_server):
    h = Handler()
    port = aiosmtpd_server(h)

    async def go():
        sock = await open_socket("127.0.0.1", port, source="127.0.0.2", timeout=5)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
            assert sock.getsockname()[0] == "127.0.0.2"
        async with session(port, source="127.0.0.2") as c:
            assert c.local[0] == "127.0.0.2"
            r = await c.send("s@example.org", RCPTS[:1], CONTENT)
            return r
    assert codes(run(go)) == ([250], 250)
    assert h.got[0].peer[0] == "127.0.0.2", f"receiver saw {h.got[0].peer}"


# -- broken peers (scripted) ---------------------------------------------------------------

async def scripted(script) -> tuple[asyncio.Server, int]:
    """A one-behaviour SMTP server on 127.0.0.1: script(reader, writer)."""
    async def handle(reader, writer):
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass        # (a cancelled handler makes 3.11's streams log an error)
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def close_after_greeting(reader, writer):
    writer.write(b"220 mx ESMTP\r\n")
    await writer.drain()


async def greeting_421(reader, writer):
    writer.write(b"421 4.3.2 mx busy, try later\r\n")
    await writer.drain()


async def greeting_554(reader, writer):
    writer.write(b"554 5.7.1 no mail from you\r\n")
    await reader.readline()     # our QUIT (RFC 5321 3.1)


async def stall_at_ehlo(reader, writer):
    writer.write(b"220 mx ESMTP\r\n")
    while await reader.read(1000):  # never answer; end when the client hangs up
        pass


async def broken_tls(reader, writer):
    writer.write(b"220 mx ESMTP\r\n")
    await reader.readline()
    writer.write(b"250-mx\r\n250 STARTTLS\r\n")
    await reader.readline()
    writer.write(b"220 go ahead\r\n")
    await writer.drain()
    await reader.read(1000)     # the ClientHello
    writer.write(b"this is not TLS\r\n" * 4)
    await writer.drain()


BROKEN = [
    # name, script, timeouts, phase, permanent, reply code, words in the message
    ("close after greeting", close_after_greeting, FAST, "performing the EHLO handshake",
     False, None, "connection lost"),
    ("421 greeting", greeting_421, FAST, "receiving the initial server greeting", False, 421,
     "service not available"),
    ("554 greeting", greeting_554, FAST, "receiving the initial server greeting", True, 554,
     "greeting refused"),
    ("stalled server", stall_at_ehlo, Timeouts(ehlo=0.3), "performing the EHLO handshake",
     False, None, "timeout"),
    ("TLS handshake fails", broken_tls, FAST, "performing the TLS handshake", False, None,
     "TLS handshake failed"),
]


@pytest.mark.parametrize("name,script,timeouts,phase,permanent,code,words", BROKEN,
                         ids=[b[0] for b in BROKEN])
def test_broken_peers(run, name, script, timeouts, phase, permanent, code, words):
    async def go():
        server, port = await scripted(script)
        async with server:
            with pytest.raises(SessionError) as err:
                await connect(port, timeouts=timeouts)
            return err.value, port
    e, port = run(go)
    got = (e.phase, e.permanent)
    assert got == (phase, permanent), f"{name}: got {got}, want {(phase, permanent)}: {e}"
    assert (e.reply and e.reply.code) == code, f"{name}: got reply {e.reply}"
    assert words in str(e) and f"127.0.0.1:{port}" in str(e), f"{name}: got {e}"


async def silent_at_end_of_data(reader, writer):
    for reply in (b"220 mx ESMTP", b"250 mx", b"250 2.1.0 ok", b"250 2.1.5 ok", b"354 go"):
        writer.write(reply + b"\r\n")     # greeting, then EHLO MAIL RCPT DATA, one by one
        await writer.drain()
        await reader.readline()
    await reader.readuntil(b"\r\n.\r\n")
    while await reader.read(1000):  # never answer the end of data
        pass


def test_stall_at_end_of_data(run):
    async def go():
        server, port = await scripted(silent_at_end_of_data)
        async with server, session(port, timeouts=Timeouts(end_of_data=0.3)) as c:
            with pytest.raises(SessionError) as err:
                await c.send("s@example.org", RCPTS[:1], CONTENT)
            return err.value, c.reusable
    e, reusable = run(go)
    assert e.phase == DOT_PHASE and "timeout" in str(e) and not reusable
    assert e.recipients == [RemoteReply(250, "2.1.5", "ok")] and not e.permanent


def test_cancelled_send_drops_the_connection(run):
    async def go():
        server, port = await scripted(silent_at_end_of_data)
        async with server, session(port) as c:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.send("s@example.org", RCPTS[:1], CONTENT), 0.3)
            reusable = c.reusable
            with pytest.raises(SessionError) as err:
                await c.send("s@example.org", RCPTS[:1], CONTENT)
            return reusable, err.value
    reusable, e = run(go)
    assert not reusable and "aborted" in str(e), f"got {e}"


def test_connect_refused(run):
    port = free_port()

    async def go():
        with pytest.raises(SessionError) as err:
            await connect(port)
        return err.value
    e = run(go)
    assert e.phase == "connecting" and not e.permanent
    assert f"127.0.0.1:{port}" in str(e) and "refused" in str(e), f"got {e}"


# -- Postfix smtp-sink -------------------------------------------------------------------

@pytest.fixture
def smtp_sink():
    """Start smtp-sink: make(*options) -> (port, dump directory)."""
    assert os.access(SMTP_SINK, os.X_OK), f"{SMTP_SINK} missing: tools/dev.sh installs postfix"
    procs, dirs = [], []

    def make(*options: str) -> tuple[int, Path]:
        dump = Path(tempfile.mkdtemp(prefix="sink-"))
        dump.chmod(0o777)               # smtp-sink writes as nobody
        dirs.append(dump)
        port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        procs.append(subprocess.Popen([SMTP_SINK, *user, "-d", f"{dump}/%H%M%S.", *options,
                                       f"127.0.0.1:{port}", "100"],
                                      stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port, dump
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    yield make
    for p in procs:
        p.kill()
        p.wait()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_smtp_sink_delivery_with_dsn(run, smtp_sink):
    port, dump = smtp_sink()

    async def go():
        async with session(port) as c:
            assert {"PIPELINING", "DSN"} <= set(c.capabilities)
            r = await c.send("s@example.org", [("a@example.net", "SUCCESS,FAILURE",
                                                "rfc822;a@example.net")], CONTENT,
                             ret="HDRS", envid="ID+2B1")
            return r
    assert codes(run(go)) == ([250], 250)
    saved = b"".join(p.read_bytes() for p in dump.iterdir())
    assert b"X-Mail-Args: <s@example.org> RET=HDRS ENVID=ID+2B1\n" in saved
    assert b"X-Rcpt-Args: <a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.net\n" \
        in saved
    # the dump holds the unstuffed message with LF line ends, then an empty line
    body = saved.split(b"(UTC)\n", 1)[1]
    assert body == CONTENT.replace(b"\r\n", b"\n") + b"\n", f"got {body!r}"


def test_smtp_sink_soft_rcpt_rejects(run, smtp_sink):
    port, _ = smtp_sink("-r", "RCPT")

    async def go():
        async with session(port) as c:
            r = await c.send("s@example.org", RCPTS[:2], CONTENT)
            reusable = c.reusable
            r2 = await c.send("s@example.org", RCPTS[:1], CONTENT)    # after the RSET
            return r, r2, reusable
    r, r2, reusable = run(go)
    assert r.recipients == [RemoteReply(450, "4.3.0", "Error: command failed")] * 2
    assert r.data is None and reusable and codes(r2) == ([450], None)


def test_smtp_sink_421_after_end_of_data(run, smtp_sink):
    port, _ = smtp_sink("-Q", ".")

    async def go():
        async with session(port) as c:
            with pytest.raises(SessionError) as err:
                await c.send("s@example.org", RCPTS[:2], CONTENT)
            return err.value
    e = run(go)
    assert e.phase == DOT_PHASE and e.reply is not None and e.reply.code == 421
    assert not e.permanent and [r.code for r in e.recipients] == [250, 250]


def test_smtp_sink_disconnect_at_rcpt(run, smtp_sink):
    port, _ = smtp_sink("-q", "RCPT")

    async def go():
        async with session(port) as c:
            with pytest.raises(SessionError) as err:
                await c.send("s@example.org", RCPTS[:2], CONTENT)
            return err.value
    e = run(go)
    assert e.phase == "sending RCPT TO" and e.reply is None and not e.permanent
    assert "connection lost" in str(e) and e.recipients == [None, None]


# -- our own listener: CHUNKING / BDAT -----------------------------------------------------

def _stored_contents(daemon) -> list[bytes]:
    out = []
    for loc in daemon.spooled().messages.values():
        seg = (daemon.spool_dir / f"{loc.segment:08d}.seg").read_bytes()
        _, _, start = rec.parse_message(seg, loc.offset, loc.length)
        content = seg[start:loc.offset + loc.length]
        out.append(content[re.search(rb"\r\n(?![ \t])", content).end():])  # after Received:
    return out


def test_bdat_to_our_listener(run, daemon_factory):
    d = daemon_factory()
    bare = b"Subject: bdat\r\n\r\n.dot\nbare LF\r\nbare\rCR\r\n"

    async def go():
        async with session(d.port, source="127.0.0.2") as c:
            assert {"CHUNKING", "PIPELINING"} <= set(c.capabilities)
            results = [await c.send("s@example.org", RCPTS[:2], content)
                       for content in (CONTENT, bare, EIGHT_BIT)]
            return results
    results = run(go)
    assert [codes(r) for r in results] == [([250, 250], 250)] * 3
    d.stop()
    stored = sorted(_stored_contents(d))
    want = sorted([CONTENT, b"Subject: bdat\r\n\r\n.dot\r\nbare LF\r\nbare CR\r\n", EIGHT_BIT])
    assert stored == want, f"got {stored}, want {want}"
