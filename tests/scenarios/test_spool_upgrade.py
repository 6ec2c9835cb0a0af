"""A spool written before the typed Envelope is delivered after the upgrade.

The segment in tests/data/spool-v2-dict-envelopes was written by the code that
passed envelopes as dicts. The daemon recovers it and delivers to real peers
(aiosmtpd, MX records from a real DNS server): the recipient already finished
(RCPTS_DONE) is not sent again, the SMTPUTF8 one goes as such, the refused one
gets a DSN that carries the old
envelope's ENVID, ORCPT and RET, and the injected message reaches both domains.
"""
from __future__ import annotations

import email
import email.policy
import shutil

from conftest import ROOT
from peers import NET, ZONE, _records

OLD = ROOT / "tests" / "data" / "spool-v2-dict-envelopes" / "00000001.seg"


def test_old_spool_is_delivered(daemon_factory, dns_server, receivers):
    mx2, dsn_box, implicit = receivers(f"{NET}.2"), receivers(f"{NET}.3"), receivers(f"{NET}.4")
    dns = dns_server(ZONE)
    d = daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n', start=False)
    d.spool_dir.mkdir(mode=0o700)
    shutil.copyfile(OLD, d.spool_dir / "00000001.seg")
    d.start()
    # one@ was finished before the upgrade, reject-two@ is refused (550)
    got = sorted((f, tuple(r)) for f, r, _ in mx2.wait(3))
    want = [("<>", ("plain@example.test",)), ("inj@sender.test", ("x@example.test",)),
            ("jörg@sender.test", ("zü@example.test",))]
    assert got == want, f"got {got}, want {want}"
    (f, r, _), = implicit.wait(1)
    assert (f, r) == ("inj@sender.test", ["y@implicit.test"])
    dsns = [m for m in dsn_box.wait(1) if m[1] == ["alice@sender.test"]]
    assert len(dsns) == 1, f"got {len(dsns)} DSNs to alice, want 1"
    report = email.message_from_bytes(dsns[0][2], policy=email.policy.default)
    status = report.get_payload()[1].get_payload()
    assert status[0]["Original-Envelope-Id"] == "QQ+314", "ENVID, xtext-decoded"
    assert status[1]["Original-Recipient"].replace(" ", "") == "rfc822;Reject-Two@Example.test"
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers", "RET=HDRS"
    bounced = [r["recipient"] for r in _records(d, "Bounce", 1)]
    assert bounced == ["reject-two@example.test"], f"got {bounced}"
    assert not [r for r in d.log_records("Delivery") if r["recipient"] == "one@example.test"]
