"""DKIM in the daemon: messages leave signed (RSA and Ed25519 together) and dkimpy
verifies what the receiver got; a bad key stops the daemon at start with a clear error."""
from __future__ import annotations

import subprocess
import sys

import dkim
import pytest

from conftest import ROOT, Daemon
from mta.dkim.signer import keygen

from peers import NET, ZONE, _send


def _keys(tmp_path):
    records = {}
    for alg, sel in (("rsa", "r2026"), ("ed25519", "e2026")):
        pem, public = keygen(alg, 2048)
        path = tmp_path / f"{sel}.pem"
        path.write_bytes(pem)
        records[f"{sel}._domainkey.sender.test."] = f"v=DKIM1; k={alg}; p={public}".encode()
    return records


@pytest.mark.parametrize("stage", ["delivery", "reception"])
def test_outgoing_mail_carries_verifiable_rsa_and_ed25519_signatures(
        daemon_factory, dns_server, receivers, tmp_path, stage):
    records = _keys(tmp_path)
    mx2 = receivers(f"{NET}.2")
    dns = dns_server(ZONE)
    d = daemon_factory(extra=(
        f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        f'[signing]\nstage = "{stage}"\n'
        f'[[dkim]]\ndomain = "sender.test"\nselector = "r2026"\nkey_file = "{tmp_path}/r2026.pem"\n'
        f'[[dkim]]\ndomain = "sender.test"\nselector = "e2026"\nkey_file = "{tmp_path}/e2026.pem"\n'))
    _send(d.port, "alice@news.sender.test", ["bob@example.test"], b"body line\r\n.dot line\r\n")
    (_, _, content), = mx2.wait(1)
    assert content.count(b"DKIM-Signature:") == 2, content[:600]
    for i in range(2):
        ok = dkim.DKIM(content).verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name.decode(), b""))
        assert ok, f"signature {i} did not verify (stage {stage})"


def test_bad_key_is_fatal_at_start(tmp_path):
    (tmp_path / "bad.pem").write_text("not a key\n")
    d = Daemon(tmp_path / "d", extra=(f'[[dkim]]\ndomain = "sender.test"\nselector = "s1"\n'
                                      f'key_file = "{tmp_path}/bad.pem"\n'))
    out = subprocess.run([sys.executable, "-m", "mta", "serve", "-c", str(d.config)],
                         capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 1, out
    assert "bad.pem" in out.stderr and "dkim[0]" in out.stderr, f"got {out.stderr!r}"
