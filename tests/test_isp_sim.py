"""The ISP simulator (tools/isp_sim, issue 12 item 5) against real SMTP clients.

Most tests run the simulator in-process on a thread with a hand-driven clock (time moves
only by sim.advance), serving MX addresses in 127.0.56.0/24 - 127.0.58.0/24 (one address per
test) on port 25, and drive it with smtplib bound to source addresses in 127.0.60-69.x. One
test runs the CLI as a process (`python -m tools.isp_sim`) with real simulated time.
"""
from __future__ import annotations

import email
import json
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dns.resolver
import pytest
from aiosmtpd.controller import Controller

from conftest import ROOT, free_port

sys.path.insert(0, str(ROOT / "tools"))
from isp_sim import Simulator, load, zone_records  # noqa: E402

HOUR, DAY = 3600.0, 86400.0
DOMAIN = "isp.test"
MSG = b"From: <news@sender.test>\r\nTo: <x@isp.test>\r\nSubject: hello\r\nMessage-ID: <m1@sender.test>\r\n\r\nbody\r\n"


def provider_toml(mx: str, **keys) -> str:
    """A one-provider config: provider 'testisp' at `mx`, domain isp.test, `keys` overriding."""
    lines = ["[providers.testisp]", f'domains = ["{DOMAIN}"]',
             f'mx = [{{ name = "mx.{DOMAIN}", address = "{mx}", preference = 10 }}]']
    replies = keys.pop("replies", {})
    sim = keys.pop("simulator", {})
    sources = keys.pop("sources", [])
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    lines += ["[providers.testisp.replies]"] + [f"{k} = {json.dumps(v)}" for k, v in replies.items()]
    lines += ["[simulator]"] + [f"{k} = {json.dumps(v)}" for k, v in sim.items()]
    for s in sources:
        lines += ["[[sources]]"] + [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def isp(tmp_path):
    """Factory: isp(mx_address, **provider keys) -> a started in-process Simulator."""
    started: list[Simulator] = []

    def make(mx: str, **keys) -> Simulator:
        cfg = load(text=provider_toml(mx, **keys))
        sim = Simulator(cfg, events=tmp_path / f"events-{mx}.jsonl", manual_clock=True)
        started.append(sim.start_thread())
        return sim

    yield make
    for sim in started:
        sim.stop()


def client(mx: str, source: str, port: int = 25) -> smtplib.SMTP:
    s = smtplib.SMTP(mx, port, timeout=10, source_address=(source, 0))
    s.ehlo("client.test")
    return s


def send(s: smtplib.SMTP, rcpt: str, sender: str = "bounce-1@sender.test"):
    """(code, text) of the first refusal, or (250, b'') when accepted."""
    code, text = s.mail(sender)
    assert code == 250, (code, text)
    code, text = s.rcpt(rcpt)
    if code != 250:
        if code != 421:
            s.rset()
        return code, text
    code, text = s.data(MSG)
    return code, text


def pair(sim: Simulator, source: str) -> dict:
    return sim.stats()["providers"]["testisp"][source]


def test_connections_and_messages_per_connection_are_capped_per_source(isp):
    mx = "127.0.56.1"
    sim = isp(mx, connections=[2, 2], per_connection=3)
    a1, a2 = client(mx, "127.0.60.1"), client(mx, "127.0.60.1")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        client(mx, "127.0.60.1")
    assert refused.value.smtp_code == 421
    b = client(mx, "127.0.60.2")           # another source has its own allowance
    for i in range(3):
        assert send(a1, f"u{i}@{DOMAIN}")[0] == 250
    code, text = a1.mail("bounce@sender.test")
    assert code == 421 and b"Too many messages on this connection" in text
    for s in (a2, b):
        s.quit()
    st = pair(sim, "127.0.60.1")
    assert st["counts"]["refused_connections"] == 1 and st["accepted"] == 3
    assert st["caps"]["connections"] == 2
    assert pair(sim, "127.0.60.2")["counts"].get("refused_connections", 0) == 0


def test_hourly_cap_defers_with_the_providers_multiline_reply_and_allowed_is_counted(isp):
    mx = "127.0.56.2"
    gmail_rate = ("421 4.7.28 [{ip}] Our system has detected an unusual rate of\n"
                  "unsolicited mail originating from your IP address. To protect our\n"
                  "users from spam, mail sent from your IP address has been temporarily\n"
                  "rate limited. - gsmtp")
    sim = isp(mx, per_day=[80, 80], per_hour_fraction=0.125, replies={"rate": gmail_rate})
    src = "127.0.60.3"
    s = client(mx, src)
    for i in range(10):
        assert send(s, f"u{i}@{DOMAIN}")[0] == 250
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        s.sendmail("bounce@sender.test", [f"over@{DOMAIN}"], MSG)
    code, text = refused.value.recipients[f"over@{DOMAIN}"]
    # smtplib joins the lines of a multi-line reply with "\n" after stripping "421-4.7.28 "
    assert code == 421
    lines = text.decode().split("\n")
    assert len(lines) == 4 and lines[0] == f"4.7.28 [{src}] Our system has detected an unusual rate of"
    assert lines[-1] == "4.7.28 rate limited. - gsmtp"
    st = pair(sim, src)
    assert (st["accepted"], st["counts"]["deferred.rate"], st["allowed"]) == (10, 1, 10)
    sim.advance(HOUR)                      # a new simulated hour: ten more
    s = client(mx, src)
    assert send(s, f"next@{DOMAIN}")[0] == 250
    s.quit()
    st = pair(sim, src)
    assert st["allowed"] == 20 and st["accepted"] == 11
    assert [h[:3] for h in st["hourly"]] == [[0, 10, 10], [1, 10, 1]]
    events = [json.loads(x) for x in Path(sim.events_path).read_text().splitlines()]
    deferred = [e for e in events if e["outcome"] == "deferred"]
    assert deferred and deferred[0]["reason"] == "rate" and deferred[0]["source"] == src
    assert deferred[0]["provider"] == "testisp" and deferred[0]["reply"].startswith("421-4.7.28")
    assert sum(e["outcome"] == "accepted" for e in events) == 11


def test_greylisting_defers_a_new_triple_for_its_minutes_then_accepts(isp):
    mx = "127.0.56.3"
    sim = isp(mx, greylist_minutes=5)
    s = client(mx, "127.0.60.4")
    assert send(s, f"a@{DOMAIN}")[0] == 451
    sim.advance(4 * 60)
    assert send(s, f"a@{DOMAIN}")[0] == 451
    sim.advance(60)
    assert send(s, f"a@{DOMAIN}")[0] == 250
    assert send(s, f"b@{DOMAIN}")[0] == 451           # another triple starts its own wait
    assert send(s, f"a@{DOMAIN}", sender="other@sender.test")[0] == 451
    s.quit()
    assert pair(sim, "127.0.60.4")["counts"]["deferred.greylist"] == 4


def test_unknown_users_drop_reputation_to_deferral_then_the_window_forgets(isp):
    mx = "127.0.56.4"
    ts01 = "421 4.7.0 [TS01] Messages from {ip} temporarily deferred due to user complaints - 4.16.55.1"
    sim = isp(mx, min_volume=20, window_hours=24, unknown_weight=5.0, defer_below=0.5,
              replies={"reputation": ts01})
    src = "127.0.60.5"
    s = client(mx, src)
    for i in range(20):
        rcpt = f"unknown{i}@{DOMAIN}" if i % 4 == 0 else f"u{i}@{DOMAIN}"   # 25 % unknown
        assert send(s, rcpt)[0] == (550 if i % 4 == 0 else 250)
    s.quit()
    assert pair(sim, src)["reputation"] == 1.0        # takes effect from the next hour
    sim.advance(HOUR)
    st = pair(sim, src)
    assert st["reputation"] == 0.0 and st["caps"]["per_hour"] == st["caps"]["per_day"] == 0
    s = client(mx, src)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        s.sendmail("bounce@sender.test", [f"good@{DOMAIN}"], MSG)
    code, text = refused.value.recipients[f"good@{DOMAIN}"]
    assert code == 421 and text == f"4.7.0 [TS01] Messages from {src} temporarily deferred due to user complaints - 4.16.55.1".encode()
    st = pair(sim, src)
    assert st["hourly"][-1][1] == 0                    # a deferred hour allows nothing
    sim.advance(DAY)                                   # the 24-hour window forgot them
    st = pair(sim, src)
    assert st["reputation"] == 1.0
    s = client(mx, src)
    assert send(s, f"good@{DOMAIN}")[0] == 250
    s.quit()


def test_persistent_excess_blocks_the_source_for_a_simulated_day(isp):
    mx = "127.0.56.5"
    sim = isp(mx, per_day=[24, 24], per_hour_fraction=0.125, block_excess=5, block_window_hours=2,
              replies={"rate": "451 4.7.500 Server busy. Please try again later from [{ip}]. (S77714)"})
    src = "127.0.60.6"
    s = client(mx, src)
    for i in range(3):
        assert send(s, f"u{i}@{DOMAIN}")[0] == 250
    for i in range(5):                                 # over the hour's cap of 3
        assert send(s, f"x{i}@{DOMAIN}")[0] == 451
    code, text = send(s, f"y@{DOMAIN}")
    assert code == 550 and text.startswith(b"5.7.1 ")
    s.quit()
    st = pair(sim, src)
    assert st["blocked"] and st["counts"]["blocks"] == 1
    (start, end), = st["blocks"]
    assert end - start == DAY
    sim.advance(23 * HOUR)
    s = client(mx, src)
    assert send(s, f"z@{DOMAIN}")[0] == 550
    sim.advance(HOUR + 1)
    assert send(s, f"z@{DOMAIN}")[0] == 250
    s.quit()
    assert not pair(sim, src)["blocked"]


def test_simulated_day_rollover_grows_the_allowance(isp):
    mx = "127.0.56.6"
    sim = isp(mx, per_day=[10, 1000], per_hour_fraction=1.0, growth=2.0,
              sources=[{"address": "127.0.60.9", "age_days": 3}])
    new, old = "127.0.60.8", "127.0.60.9"
    s = client(mx, new)
    for i in range(10):
        assert send(s, f"u{i}@{DOMAIN}")[0] == 250
    assert send(s, f"over@{DOMAIN}")[0] == 421
    st = pair(sim, new)
    assert (st["age_days"], st["caps"]["per_day"]) == (0, 10)
    assert pair(sim, old)["caps"]["per_day"] == 80     # configured: 3 days old
    sim.advance(DAY)
    st = pair(sim, new)
    assert (st["age_days"], st["caps"]["per_day"], st["allowed"]) == (1, 20, 30)
    s = client(mx, new)
    for i in range(20):
        assert send(s, f"d1-{i}@{DOMAIN}")[0] == 250
    assert send(s, f"over@{DOMAIN}")[0] == 421
    # the configured source accrued its allowance from hour 0 without ever connecting
    assert pair(sim, old)["allowed"] == 80 + 160


def test_arf_report_reaches_the_bounce_domain_listener(tmp_path):
    got: list[tuple[str, str, list[str], bytes]] = []
    arrived = threading.Event()

    class Fbl:
        async def handle_DATA(self, server, session, envelope):
            got.append((session.peer[0], envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            arrived.set()
            return "250 2.0.0 report taken"

    fbl_port = free_port()
    ctl = Controller(Fbl(), hostname="127.0.0.1", port=fbl_port)
    ctl.start()
    mx = "127.0.56.7"
    cfg = load(text=provider_toml(mx, simulator={"fbl_to": "fbl@bounces.sender.test",
                                                 "fbl_host": f"127.0.0.1:{fbl_port}"}))
    sim = Simulator(cfg, manual_clock=True).start_thread()
    try:
        s = client(mx, "127.0.60.10")
        assert send(s, f"complain-1@{DOMAIN}", sender="b-verp+tok@sender.test")[0] == 250
        assert send(s, f"happy@{DOMAIN}")[0] == 250
        s.quit()
        assert arrived.wait(15), "no ARF report arrived"
        time.sleep(0.3)
        assert len(got) == 1
        peer, mail_from, rcpts, data = got[0]
        assert peer == mx and rcpts == ["fbl@bounces.sender.test"] and mail_from == f"feedback@{DOMAIN}"
        msg = email.message_from_bytes(data)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "feedback-report"
        _human, report, original = msg.get_payload()
        fields = report.get_payload()[0] if report.is_multipart() else email.message_from_string(report.get_payload())
        assert fields["Feedback-Type"] == "abuse" and fields["Source-IP"] == "127.0.60.10"
        assert fields["Original-Mail-From"] == "<b-verp+tok@sender.test>"
        assert fields["Original-Rcpt-To"] == f"<complain-1@{DOMAIN}>"
        assert original.get_content_type() == "text/rfc822-headers"
        headers = email.message_from_string(original.get_payload())
        assert headers["Return-Path"] == "<b-verp+tok@sender.test>" and headers["Subject"] == "hello"
        from mta.feedback.bounce.parser import parse_message   # the MTA's own parser reads it
        parsed = parse_message(data)
        assert parsed.kind == "feedback" and parsed.feedback.feedback_type == "abuse"
        # RFC 5965's fields are RFC 5321 paths (angle brackets); the MTA keeps them as written
        assert parsed.feedback.original_rcpt_to.strip("<>") == f"complain-1@{DOMAIN}"
        st = sim.stats()
        assert st["arf"] == {"sent": 1, "failed": 0, "dropped": 0}
        assert st["providers"]["testisp"]["127.0.60.10"]["counts"]["complaints"] == 1
    finally:
        sim.stop()
        ctl.stop()


def test_shipped_providers_zone_and_replies(tmp_path, dns_server):
    cfg = load(ROOT / "tools" / "isp_sim" / "providers.toml", port=free_port())
    assert set(cfg.providers) == {"gmail", "yahoo", "microsoft", "smallisp"}
    server = dns_server(zone_records(cfg))
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port = ["127.0.0.1"], server.port
    mx = sorted((r.preference, str(r.exchange)) for r in res.resolve("gmail.test", "MX"))
    assert mx[0] == (5, "gmail-smtp-in.l.google.com.")
    assert [str(r) for r in res.resolve("gmail-smtp-in.l.google.com", "A")] == ["127.0.50.1"]
    assert sorted(str(r) for r in res.resolve("outlook-test.olc.protection.outlook.com", "A")) == \
        ["127.0.52.1", "127.0.52.2"]
    # the shipped replies on the wire (its own port: the shipped addresses may be busy on 25)
    sim = Simulator(cfg, manual_clock=True).start_thread()
    try:
        s = client("127.0.50.1", "127.0.60.11", port=cfg.port)
        code, text = send(s, "unknown-someone@gmail.test")
        assert code == 550 and text.split(b"\n")[0].startswith(b"5.1.1 The email account") \
            and len(text.split(b"\n")) == 4
        s.quit()
        s = client("127.0.51.2", "127.0.60.11", port=cfg.port)
        code, text = send(s, "unknown1@yahoo.test")
        assert code == 554 and b"This user doesn't have a yahoo.test account" in text
        assert send(s, "fine@aol.test") == (250, b"ok dirdel")
        s.quit()
    finally:
        sim.stop()


def test_cli_serves_reports_and_stops_on_sigterm(tmp_path):
    mx = "127.0.58.1"
    conf = tmp_path / "p.toml"
    conf.write_text(provider_toml(mx, per_day=[1000, 1000]))
    events, stats = tmp_path / "ev.jsonl", tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.isp_sim", "-c", str(conf), "--day-seconds", "60", "--events", str(events),
         "--stats-file", str(stats), "--clock-control", "--http", "127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("isp_sim: ready"), line + proc.stderr.read()
        http = line.split("http=")[1].split()[0]
        s = client(mx, "127.0.62.1")
        assert send(s, f"u@{DOMAIN}")[0] == 250
        s.quit()
        st = json.loads(urllib.request.urlopen(f"http://{http}/stats", timeout=10).read())
        assert st["providers"]["testisp"]["127.0.62.1"]["accepted"] == 1 and st["day_seconds"] == 60
        req = urllib.request.Request(f"http://{http}/clock?advance=86400", method="POST")
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["sim_time"] >= DAY
        zone = urllib.request.urlopen(f"http://{http}/zone", timeout=10).read().decode()
        assert f"mx.{DOMAIN}. 300 IN A {mx}" in zone
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ev = [json.loads(x) for x in events.read_text().splitlines()]
    assert ev[0]["source"] == "127.0.62.1" and ev[0]["outcome"] == "accepted" and ev[0]["provider"] == "testisp"
    assert json.loads(stats.read_text())["day"] >= 1
    page = tmp_path / "plot.html"                     # the plot helper reads the stats file
    subprocess.run([sys.executable, "-m", "tools.isp_sim.plot", str(stats), str(page)], cwd=ROOT, check=True,
                   timeout=30)
    text = page.read_text()
    assert text.count("<svg") == 1 and "<td>testisp</td><td>127.0.62.1</td>" in text


def test_mta_daemon_delivers_through_the_simulator(isp, dns_server, daemon_factory):
    """A real `mta serve` with two egress sources, MX found through DNS from zone_records():
    the simulator accepts up to each source's allowance, refuses an unknown user with its
    multi-line reply, and the MTA logs a Delivery per accepted message and a Bounce."""
    mx = "127.0.57.1"
    unknown = ("550 5.1.1 The email account that you tried to reach does not exist. Please try\n"
               "double-checking the recipient's email address for typos. - gsmtp")
    sim = isp(mx, connections=[2, 2], per_connection=3, replies={"unknown": unknown})
    server = dns_server(zone_records(sim.cfg))
    d = daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{server.port}"]\n'
                             '[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n'
                             '[egress]\ndefault_pool = "main"\n'
                             '[[source]]\nname = "a"\naddress = "127.0.63.1"\n'
                             '[[source]]\nname = "b"\naddress = "127.0.63.2"\n'
                             '[[pool]]\nname = "main"\nsources = ["a", "b"]\n')
    rcpts = [f"user{i}@{DOMAIN}" for i in range(8)] + [f"unknown-x@{DOMAIN}"]
    for r in rcpts:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
            s.sendmail("news@sender.test", [r], MSG)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(d.log_records("Delivery")) >= 8 and any(b["recipient"] == f"unknown-x@{DOMAIN}"
                                                       for b in d.log_records("Bounce")):
            break
        time.sleep(0.2)
    assert len(d.log_records("Delivery")) == 8, d.log_records()[-5:]
    bounce = next(b for b in d.log_records("Bounce") if b["recipient"] == f"unknown-x@{DOMAIN}")
    assert (bounce["code"], bounce["status"], bounce["hard"]) == (550, "5.1.1", True)
    assert bounce["text"].endswith("double-checking the recipient's email address for typos. - gsmtp")
    st = sim.stats()["providers"]["testisp"]
    assert sum(p["accepted"] for p in st.values()) == 8
    assert set(st) <= {"127.0.63.1", "127.0.63.2"} and all(p["open"] <= 2 for p in st.values())
    assert sum(p["counts"].get("rejected.unknown", 0) for p in st.values()) == 1
    accepted = [e for e in sim.events() if e["outcome"] == "accepted"]
    assert len(accepted) == 8 and all(e["tls"] for e in accepted)     # the MTA took the STARTTLS offer


def test_complaints_drop_reputation_and_are_logged_without_a_feedback_loop(isp):
    mx = "127.0.56.8"
    sim = isp(mx, min_volume=10, complaint_weight=150.0, arf=False)
    src = "127.0.60.12"
    s = client(mx, src)
    for i in range(10):
        assert send(s, f"complain-{i}@{DOMAIN}" if i == 0 else f"u{i}@{DOMAIN}")[0] == 250
    s.quit()
    sim.advance(HOUR)
    st = pair(sim, src)
    assert st["counts"]["complaints"] == 1 and st["reputation"] == 0.0   # 1 - 150 * 10 %
    s = client(mx, src)
    assert send(s, f"later@{DOMAIN}")[0] == 421
    assert [e["outcome"] for e in sim.events() if e["stage"] == "complaint"] == ["no_report"]


def test_a_reset_transaction_gives_its_units_back(isp):
    mx = "127.0.56.9"
    sim = isp(mx, per_day=[8, 8], per_hour_fraction=0.125)      # one recipient an hour
    s = client(mx, "127.0.60.13")
    assert s.mail("b@sender.test")[0] == 250 and s.rcpt(f"a@{DOMAIN}")[0] == 250
    assert s.rset()[0] == 250
    assert send(s, f"a@{DOMAIN}")[0] == 250
    assert send(s, f"b@{DOMAIN}")[0] == 421
    assert pair(sim, "127.0.60.13")["accepted"] == 1


def test_fractions_hit_the_same_recipients_for_a_seed():
    from isp_sim import Clock, Model

    def unknown_set(seed: int) -> set[str]:
        cfg = load(text=provider_toml("127.0.56.10", unknown_fraction=0.3, unknown_prefix="", per_day=[10**6, 10**6],
                                      simulator={"seed": seed}))
        model = Model(cfg, Clock(cfg.day_seconds, manual=True))
        p = cfg.providers["testisp"]
        return {r for i in range(1000) if model.rcpt("127.0.60.14", p, "b@s.test", r := f"u{i}@{DOMAIN}")[1] == "unknown"}

    first = unknown_set(1)
    assert 250 <= len(first) <= 350 and unknown_set(1) == first and unknown_set(2) != first


@pytest.mark.parametrize("text, want", [
    ('[providers.x]\ndomains = ["a.test"]\nmx = [{name = "m", address = "10.0.0.1"}]\n', "providers.x.mx[0].address"),
    ('[providers.x]\ndomains = ["a.test"]\nmx = [{name = "m", address = "127.0.56.1"}]\nper_day = [10, 5]\n',
     "providers.x.per_day"),
    ('[providers.x]\ndomains = ["a.test"]\nmx = [{name = "m", address = "127.0.56.1"}]\nspeed = 1\n',
     "providers.x: unknown keys ['speed']"),
    ('[providers.x]\ndomains = ["a.test"]\nmx = [{name = "m", address = "127.0.56.1"}]\n'
     '[providers.x.replies]\nrate = "slow down"\n', "providers.x.replies.rate"),
])
def test_config_errors_name_the_key(text, want):
    with pytest.raises(ValueError, match=re.escape(want)):
        load(text=text)


def test_starttls_then_a_fresh_ehlo(isp):
    import ssl
    mx = "127.0.56.11"
    sim = isp(mx)
    s = client(mx, "127.0.60.15")
    assert s.has_extn("starttls")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    assert s.starttls(context=ctx)[0] == 220
    s.ehlo("client.test")
    assert not s.has_extn("starttls") and s.sock.version().startswith("TLS")
    assert send(s, f"u@{DOMAIN}")[0] == 250
    s.quit()
    assert pair(sim, "127.0.60.15")["accepted"] == 1
