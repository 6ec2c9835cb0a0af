"""TLS-RPT (RFC 8460, mta/delivery/tlsrpt.py): the rua parser, and a real daemon that
counts its sessions to MTA-STS domains, keeps the counts across a restart, and at the end
of its (short) window mails the report (multipart/report, application/tlsrpt+gzip) to the
mailto: rua through its own queue and POSTs it to the https: rua. Peers: unbound
(MX/A/TXT), aiosmtpd receivers with STARTTLS, aiohttp HTTPS on 127.0.85.x:443 serving the
MTA-STS policies and taking the POST."""
from __future__ import annotations

import asyncio
import email
import gzip
import json
import threading
import time

from aiosmtpd.controller import Controller
from peers import Receiver, _records, _send
from tls_certs import Ca, txt_dns_server

from mta.delivery.tlsrpt import parse_rua

NET = "127.0.85"
WEB = f"{NET}.60"


def test_parse_rua():
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x"]) == [
        "mailto:a@b.test", "https://r.test/x"]
    assert parse_rua(["v=TLSRPTv1;rua=mailto:a@b.test!10m"]) == []       # not an address
    assert parse_rua(["v=TLSRPTv1; rua=http://r.test/x, ftp://x"]) == []
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@b.test", "v=TLSRPTv1; rua=mailto:c@d.test"]) == []
    assert parse_rua(["v=spf1 -all"]) == []
    assert len(parse_rua(["v=TLSRPTv1; rua=" + ",".join(f"mailto:a{i}@b.test" for i in range(20))])) == 5


def test_reports_mailed_and_posted_after_a_restart(tmp_path, daemon_factory):
    ca = Ca()
    ca_file = ca.write(tmp_path / "ca.pem")
    zone = [
        "good.test. 60 IN MX 10 mx.good.test.", f"mx.good.test. 60 IN A {NET}.51",
        "bad.test. 60 IN MX 10 mx.bad.test.", f"mx.bad.test. 60 IN A {NET}.52",
        "reports.test. 60 IN MX 10 mx.reports.test.", f"mx.reports.test. 60 IN A {NET}.53",
        f"mta-sts.good.test. 60 IN A {WEB}", f"mta-sts.bad.test. 60 IN A {WEB}",
        f"rpt.reports.test. 60 IN A {WEB}",
        '_mta-sts.good.test. 60 IN TXT "v=STSv1; id=1"',
        '_mta-sts.bad.test. 60 IN TXT "v=STSv1; id=1"',
        '_smtp._tls.good.test. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"',
        '_smtp._tls.bad.test. 60 IN TXT "v=TLSRPTv1; rua=https://rpt.reports.test/tlsrpt"',
    ]
    dns = txt_dns_server(zone)
    rx = {}
    ctls = []
    for n, name in ((51, "mx.good.test"), (52, "wrong.test"), (53, "mx.reports.test")):
        rx[n] = Receiver()
        ctl = Controller(rx[n], hostname=f"{NET}.{n}", port=25,
                         tls_context=ca.issue(name).server_context(tmp_path, f"r{n}"))
        ctl.start()
        ctls.append(ctl)
    posts: list[tuple[str, bytes]] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def web():
        from aiohttp import web as w

        async def policy(request):
            host = request.host.split(":")[0].removeprefix("mta-sts.")
            return w.Response(text=f"version: STSv1\nmode: enforce\nmx: mx.{host}\n"
                                   "max_age: 86400\n", content_type="text/plain")

        async def post(request):
            posts.append((request.headers.get("Content-Type", ""), await request.read()))
            return w.Response(status=201)
        app = w.Application()
        app.router.add_get("/.well-known/mta-sts.txt", policy)
        app.router.add_post("/tlsrpt", post)
        runner = w.AppRunner(app)
        await runner.setup()
        issued = ca.issue("mta-sts.good.test", "mta-sts.bad.test", "rpt.reports.test")
        await w.TCPSite(runner, WEB, 443, ssl_context=issued.server_context(tmp_path, "web")).start()
        return runner
    runner = asyncio.run_coroutine_threadsafe(web(), loop).result(10)
    try:
        d = daemon_factory(extra=(
            f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "2s"\n'
            f'[delivery]\nretry_initial = "1h"\nretry_max = "1h"\ntls_ca_file = "{ca_file}"\n'
            'tls_report_interval = "8s"\n'))
        _send(d.port, "s@sender.test", ["a@good.test"])
        _send(d.port, "s@sender.test", ["b@bad.test"])
        rx[51].wait(1)
        _records(d, "TransientFailure", 1)
        # a restart inside the window keeps the counts
        d.stop()
        saved = json.loads((d.spool_dir / "tlsrpt.json").read_text())
        assert saved["domains"]["good.test"]["ok"] == 1, saved
        assert list(saved["domains"]["bad.test"]["fail"].values()) == [1], saved
        d.start()
        got = rx[53].wait(1, timeout=30)
        mail_from, rcpts, raw = got[0]
        assert rcpts == ["tlsrpt@reports.test"] and mail_from in ("", "<>")
        msg = email.message_from_bytes(raw)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        assert msg["TLS-Report-Domain"] == "good.test" and msg["TLS-Report-Submitter"]
        assert msg["Subject"].startswith("Report Domain: good.test Submitter: ")
        [part] = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
        report = json.loads(gzip.decompress(part.get_payload(decode=True)))
        pol = report["policies"][0]
        assert pol["policy"]["policy-type"] == "sts" and pol["policy"]["policy-domain"] == "good.test"
        assert pol["summary"] == {"total-successful-session-count": 1,
                                  "total-failure-session-count": 0}
        assert set(report) >= {"organization-name", "date-range", "contact-info", "report-id"}
        deadline = time.monotonic() + 15
        while not posts and time.monotonic() < deadline:
            time.sleep(0.1)
        ctype, body = posts[0]
        assert ctype == "application/tlsrpt+gzip"
        bad = json.loads(gzip.decompress(body))["policies"][0]
        assert bad["summary"]["total-failure-session-count"] == 1
        [row] = bad["failure-details"]
        assert row["result-type"] == "certificate-host-mismatch"
        assert row["receiving-mx-hostname"] == "mx.bad.test" and row["receiving-ip"] == f"{NET}.52"
        assert rx[52].messages == []
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        for ctl in ctls:
            ctl.stop()
        dns.stop()
