"""Which signatures a message gets: From-domain parsing, parent-domain fallback, the
policy hook, and key loading errors at start (named by table)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from mta.config import parse_config
from mta.dkim.domains import SigningDomains, from_domain
from mta.dkim.signer import DkimConfigError, keygen
from mta.model.envelope import Envelope


@pytest.mark.parametrize("headers,want", [
    (b"From: Alice <alice@Example.COM>\r\nTo: b@x\r\n\r\nbody", "example.com"),
    (b"To: b@x\r\nfrom:\r\n  \"Bob, Jr\" <bob@news.example.org>\r\n\r\n", "news.example.org"),
    (b"Subject: no from\r\n\r\nFrom: body@not.header\r\n", None),
    (b"From: undisclosed-recipients:;\r\n\r\n", None),
])
def test_from_domain(headers, want):
    got = from_domain(headers)
    assert got == want, f"got {got!r}, want {want!r}"


def _tables(tmp_path: Path, domains: list[str]):
    text = ""
    for i, d in enumerate(domains):
        pem, _ = keygen("ed25519")
        (tmp_path / f"k{i}.pem").write_bytes(pem)
        text += f'[[dkim]]\ndomain = "{d}"\nselector = "s{i}"\nkey_file = "{tmp_path}/k{i}.pem"\n'
    return parse_config(text).dkim


def test_parent_domain_and_multiple_signatures(tmp_path):
    domains = SigningDomains(_tables(tmp_path, ["example.com", "example.com", "other.org"]))
    got = [(s.key.domain, s.key.selector) for s in domains.for_domain("news.example.com")]
    assert got == [("example.com", "s0"), ("example.com", "s1")], f"got {got}"
    assert domains.for_domain("example.net") == []
    assert domains.for_domain(None) == []


def test_policy_hook_overrides(tmp_path):
    hook = types.ModuleType("mta_test_dkim_policy")
    hook.choose = lambda dom, env: ["other.org"] if env.sender.startswith("bulk") else None
    sys.modules["mta_test_dkim_policy"] = hook
    domains = SigningDomains(_tables(tmp_path, ["example.com", "other.org"]),
                             "mta_test_dkim_policy:choose")
    msg = b"From: a@example.com\r\n\r\nx\r\n"
    assert [s.key.domain for s in domains.for_message(msg, Envelope("", "bulk@x", []))] == ["other.org"]
    assert [s.key.domain for s in domains.for_message(msg, Envelope("", "tx@x", []))] == ["example.com"]


def test_bad_key_and_bad_hook_are_named(tmp_path):
    (tmp_path / "bad.pem").write_text("garbage")
    tables = parse_config(f'[[dkim]]\ndomain = "a.example"\nselector = "s"\n'
                          f'key_file = "{tmp_path}/bad.pem"\n').dkim
    with pytest.raises(DkimConfigError, match=r"dkim\[0\].*bad\.pem"):
        SigningDomains(tables)
    with pytest.raises(DkimConfigError, match="signing.policy"):
        SigningDomains((), "no_such_module_xyz:f")
