"""Egress content scanning (mta/ingest/scan.py) without spamd: the policy's decisions,
the [[scan]] config, the SPAMC reply parser on good and hostile replies, and the client
against scripted asyncio servers (down, slow, endless, error replies) under the
per-table timeout and concurrency bound. The real spamd runs in
tests/scenarios/test_scanning.py."""
from __future__ import annotations

import asyncio

import pytest

from mta.config import ConfigError
from mta.config.load import load_config
from mta.ingest.scan import (REJECT, REJECT_VIRUS, TEMPFAIL, ScanError, ScanPolicy, Scanning,
                             SpamdResult, parse_clamd_reply, parse_spamd_reply)
from mta.model.envelope import Envelope, Recipient

GOOD = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 15\r\nSpam: True ; 1000.5 / 5.0\r\n\r\n"
        b"GTUBE,MISSING_DATE")


def _config(tmp_path, scan: str):
    p = tmp_path / "mta.toml"
    p.write_text(f'[spool]\ndirectory = "{tmp_path}/spool"\n[log]\ndirectory = "{tmp_path}/log"\n'
                 f'[[listener]]\nport = 2599\n{scan}')
    return load_config(p)


def _policy(tmp_path, **kw) -> ScanPolicy:
    body = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in kw.items())
    return ScanPolicy(_config(tmp_path, "[[scan]]\n" + body).scan[0])


def test_config_defaults_and_checks(tmp_path):
    cfg = _config(tmp_path, '[[scan]]\ntenant = "a"\n[[scan]]\naddress = "127.0.0.2:1783"\n'
                            'threshold = 7\naction = "hold"\nfail = "closed"\n')
    a, rest = cfg.scan
    assert (a.tenant, a.scanner, a.address, a.threshold, a.action, a.fail) == \
        ("a", "spamd", None, 5.0, "reject", "open")
    assert (rest.tenant, rest.address, rest.threshold, rest.action, rest.fail) == \
        ("", ("127.0.0.2", 1783), 7.0, "hold", "closed")
    assert _config(tmp_path, "").scan == ()
    for bad in ('threshold = "high"', 'threshold = true', 'action = "bounce"',
                'fail = "maybe"', 'concurrency = 0', 'scanner = "rspamd"'):
        with pytest.raises(ConfigError) as e:
            _config(tmp_path, f"[[scan]]\n{bad}\n")
        assert f"scan[0].{bad.split()[0]}" in str(e.value)


def test_policy_per_tenant(tmp_path):
    cfg = _config(tmp_path, '[[scan]]\ntenant = "a"\naction = "tag"\n'
                            '[[scan]]\ntenant = "b"\naction = "drop"\n')
    s = Scanning(cfg.scan, None)
    assert s.policy_for("a")[0].cfg.action == "tag"
    assert s.policy_for("b")[0].cfg.action == "drop"
    assert s.policy_for("c") is None and s.policy_for(None) is None   # no default table
    cfg = _config(tmp_path, '[[scan]]\ntenant = "a"\n[[scan]]\naction = "hold"\n')
    s = Scanning(cfg.scan, None)
    assert s.policy_for("zzz")[0].cfg.action == "hold" and s.policy_for(None)[0].cfg.action == "hold"
    assert s.policy_for("a")[0].cfg.action == "reject"


@pytest.mark.parametrize("action", ["reject", "hold", "tag", "drop", "accept"])
def test_decide(tmp_path, action):
    p = _policy(tmp_path, action=action, threshold=5)
    spam = p.decide(SpamdResult(False, 5.0, 10.0, ("X",)))   # our threshold, not spamd's
    assert (spam.action, spam.spam, spam.score) == (action, True, 5.0)
    clean = p.decide(SpamdResult(True, 4.9, 1.0, ()))
    assert clean.action == ("tag" if action == "tag" else "accept") and clean.spam is False
    assert p.decide(None, "down").action == "accept"                      # fail open default
    assert _policy(tmp_path, fail="closed").decide(None, "down").action == "tempfail"
    assert p.decide(None, oversize=True).action == "accept"
    assert _policy(tmp_path, oversize="hold").decide(None, oversize=True).action == "hold"


def test_tag_headers(tmp_path):
    p = _policy(tmp_path, action="tag")
    spam = p.tag_headers(p.decide(SpamdResult(True, 1000.0, 5.0, ("GTUBE", "NO_DATE"))))
    assert spam == (b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=1000.0 required=5.0 "
                    b"tests=GTUBE,NO_DATE\r\n")
    clean = p.tag_headers(p.decide(SpamdResult(False, -0.1, 5.0, ())))
    assert clean == b"X-Spam-Status: No, score=-0.1 required=5.0 tests=none\r\n"


def test_parse_reply():
    r = parse_spamd_reply(GOOD)
    assert r == SpamdResult(True, 1000.5, 5.0, ("GTUBE", "MISSING_DATE"))
    r = parse_spamd_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -1.2 / 5.0\r\n\r\n")
    assert r == SpamdResult(False, -1.2, 5.0, ())
    # hostile symbol lists: odd names dropped, the count bounded
    r = parse_spamd_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9 / 5\r\n\r\nA,<script>,B\r\n"
                          + b",".join(b"S%d" % i for i in range(500)))
    assert r.symbols[:2] == ("A", "B") and len(r.symbols) == 64
    for bad in (b"", b"HTTP/1.1 200 OK\r\n\r\n", b"SPAMD/1.1 76 EX_PROTOCOL\r\n\r\n",
                b"SPAMD/1.1 0 EX_OK\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; nan / 5\r\n\r\n",
                b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1e999 / 5\r\n\r\n"):
        with pytest.raises(ScanError):
            parse_spamd_reply(bad)


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _env(tenant: str = "t") -> Envelope:
    return Envelope("00" * 16, "a@s.test", [Recipient("b@d.test", None, None)], "h", "127.0.0.1",
                    1, "main", "ESMTP", 0.0, 0, "", False, None, None, tenant=tenant)


def _run(coro):
    return asyncio.run(coro)


def test_client_request_and_reply(tmp_path):
    seen = {}

    async def main():
        async def handler(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
            seen["head"], seen["body"] = head, await reader.readexactly(n)
            writer.write(GOOD)
            await writer.drain()
            writer.close()
        server, port = await _serve(handler)
        async with server:
            p = _policy(tmp_path, address=f"127.0.0.1:{port}", user="news")
            return await p.scan(b"Subject: x\r\n\r\nbody\r\n")
    d = _run(main())
    assert seen["head"].startswith(b"SYMBOLS SPAMC/1.5\r\nContent-length: 20\r\nUser: news\r\n")
    assert seen["body"] == b"Subject: x\r\n\r\nbody\r\n"
    assert (d.action, d.spam, d.score, d.symbols) == ("reject", True, 1000.5,
                                                      ("GTUBE", "MISSING_DATE"))


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_client_failures_follow_the_policy(tmp_path, fail):
    async def endless(reader, writer):
        writer.write(b"SPAMD/1.1 0 EX_OK\r\n")
        try:
            while True:
                writer.write(b"X" * 65536)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def silent(reader, writer):
        await asyncio.sleep(30)

    async def main():
        out = {}
        for name, handler in (("endless", endless), ("silent", silent)):
            server, port = await _serve(handler)
            async with server:
                p = _policy(tmp_path, address=f"127.0.0.1:{port}", fail=fail, timeout="500ms")
                out[name] = await p.scan(b"x\r\n")
                server.close()
        # nobody listening
        server, port = await _serve(silent)
        server.close()
        await server.wait_closed()
        p = _policy(tmp_path, address=f"127.0.0.1:{port}", fail=fail)
        out["down"] = await p.scan(b"x\r\n")
        return out
    out = _run(main())
    want = "accept" if fail == "open" else "tempfail"
    assert {k: d.action for k, d in out.items()} == {"endless": want, "silent": want, "down": want}
    assert "too long" in out["endless"].reason
    assert "within" in out["silent"].reason
    assert "cannot connect" in out["down"].reason
    assert all(d.spam is None for d in out.values())


def test_oversize_is_not_sent(tmp_path):
    async def main():
        p = _policy(tmp_path, address="127.0.0.1:9", max_size="1KiB", oversize="reject")
        return await p.scan(b"x" * 2000)
    d = _run(main())
    assert (d.action, d.reason) == ("reject", "oversize")


def test_concurrency_is_bounded(tmp_path):
    state = {"now": 0, "max": 0}

    async def main():
        async def handler(reader, writer):
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.05)
            state["now"] -= 1
            writer.write(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.0 / 5.0\r\n\r\n")
            await writer.drain()
            writer.close()
        server, port = await _serve(handler)
        async with server:
            p = _policy(tmp_path, address=f"127.0.0.1:{port}", concurrency=2, timeout="60s")
            return await asyncio.gather(*(p.scan(b"x\r\n") for _ in range(10)))
    ds = _run(main())
    assert [d.action for d in ds] == ["accept"] * 10
    assert state["max"] == 2


@pytest.mark.parametrize("action,want", [("reject", REJECT), ("drop", b"250 "),
                                         ("hold", b"250 stored"), ("tag", b"250 stored"),
                                         ("accept", b"250 stored")])
def test_check_acts_on_the_verdict(tmp_path, action, want):
    held, stored, unheld = [], [], []

    async def main():
        async def handler(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1000 / 5.0\r\n\r\nGTUBE")
            await writer.drain()
            writer.close()
        server, port = await _serve(handler)
        async with server:
            cfg = _config(tmp_path, f'[[scan]]\naddress = "127.0.0.1:{port}"\n'
                                    f'action = "{action}"\n')
            s = Scanning(cfg.scan, None)
            s.hold, s.unhold = held.append, unheld.append

            async def store(content):
                stored.append(content)
                return b"250 stored\r\n"
            return await s.check(s.policy_for("t"), memoryview(b"Subject: x\r\n\r\nhi\r\n"),
                                 b"\x01" * 16, _env(), store)
    answer = _run(main())
    assert answer.startswith(want), answer
    assert held == ([b"\x01" * 16] if action == "hold" else []) and unheld == []
    if action in ("reject", "drop"):
        assert stored == []
    elif action == "tag":
        assert stored == [b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=1000.0 required=5.0 "
                          b"tests=GTUBE\r\nSubject: x\r\n\r\nhi\r\n"]
    else:
        assert stored == [b"Subject: x\r\n\r\nhi\r\n"]


def test_closed_scanner_down_answers_451_and_stores_nothing(tmp_path):
    stored = []

    async def main():
        cfg = _config(tmp_path, '[[scan]]\naddress = "127.0.0.1:9"\nfail = "closed"\n')
        s = Scanning(cfg.scan, None)

        async def store(content):
            stored.append(content)
            return b"250 stored\r\n"
        return await s.check(s.policy_for(None), b"x\r\n", b"\x01" * 16, _env(), store)
    assert _run(main()) == TEMPFAIL and stored == []


def test_hold_is_taken_off_when_the_store_fails(tmp_path):
    held, unheld = [], []

    async def main():
        cfg = _config(tmp_path, '[[scan]]\naddress = "127.0.0.1:9"\nfail = "open"\n'
                                'max_size = "1KiB"\noversize = "hold"\n')
        s = Scanning(cfg.scan, None)
        s.hold, s.unhold = held.append, unheld.append

        async def store(content):
            return b"451 4.3.0 spool error\r\n"
        return await s.check(s.policy_for(None), b"x" * 2000, b"\x02" * 16, _env(), store)
    assert _run(main()).startswith(b"451")
    assert held == unheld == [b"\x02" * 16]


def test_clamd_reply_and_decision(tmp_path):
    assert parse_clamd_reply(b"stream: OK") == SpamdResult(False, None, None, ())
    r = parse_clamd_reply(b"stream: Eicar-Test-Signature FOUND")
    assert r.spam and r.symbols == ("Eicar-Test-Signature",)
    for bad in (b"", b"INSTREAM size limit exceeded. ERROR", b"stream: <x y> FOUND",
                b"stream: " + b"A" * 300 + b" FOUND"):
        with pytest.raises(ScanError):
            parse_clamd_reply(bad)
    p = _policy(tmp_path, scanner="clamd", action="tag")
    assert (p.host, p.port) == ("127.0.0.1", 3310)
    d = p.decide(r)
    assert (d.action, d.spam, d.reason) == ("tag", True, "malware")
    assert p.tag_headers(d) == b"X-Virus-Status: Infected (Eicar-Test-Signature)\r\n"
    assert p.tag_headers(p.decide(parse_clamd_reply(b"stream: OK"))) == b"X-Virus-Status: Clean\r\n"


def test_clamd_instream_and_two_tables(tmp_path):
    """clamd gets length-prefixed chunks and a zero chunk; with a spamd table for the same
    tenant both scan, the strictest decision wins and the tag headers still apply."""
    got = {}
    big = b"Subject: v\r\n\r\n" + b"v" * 200000

    async def main():
        async def clamd(reader, writer):
            assert await reader.readexactly(10) == b"zINSTREAM\0"
            data, got["chunks"] = b"", []
            while True:
                n = int.from_bytes(await reader.readexactly(4), "big")
                if n == 0:
                    break
                got["chunks"].append(n)
                data += await reader.readexactly(n)
            got["data"] = data
            writer.write(b"stream: Test.Virus FOUND\0")
            await writer.drain()
            writer.close()

        async def spamd(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.split(b"Content-length: ")[1].split(b"\r\n")[0]))
            writer.write(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.5 / 5.0\r\n\r\n")
            await writer.drain()
            writer.close()
        c_server, c_port = await _serve(clamd)
        s_server, s_port = await _serve(spamd)
        async with c_server, s_server:
            out = {}
            for clam_action in ("reject", "hold"):
                cfg = _config(tmp_path, f'[[scan]]\nscanner = "clamd"\naddress = "127.0.0.1:{c_port}"\n'
                                        f'action = "{clam_action}"\n'
                                        f'[[scan]]\naddress = "127.0.0.1:{s_port}"\naction = "tag"\n')
                s = Scanning(cfg.scan, None)
                held, stored = [], []
                s.hold, s.unhold = held.append, held.remove

                async def store(content):
                    stored.append(content)
                    return b"250 stored\r\n"
                answer = await s.check(s.policy_for("x"), big, b"\x03" * 16, _env(), store)
                out[clam_action] = (answer, held, stored)
            return out
    out = _run(main())
    assert got["data"] == big and max(got["chunks"]) <= 65536 and len(got["chunks"]) == 4
    assert out["reject"] == (REJECT_VIRUS, [], [])
    answer, held, stored = out["hold"]
    assert answer == b"250 stored\r\n" and held == [b"\x03" * 16]
    assert stored == [b"X-Spam-Status: No, score=0.5 required=5.0 tests=none\r\n" + big]
