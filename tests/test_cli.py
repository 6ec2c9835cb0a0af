"""The `mta` command's conventions, run as a subprocess where the behaviour belongs to the
process (exit statuses, tracebacks, closed pipes): common options anywhere on the line,
--version, exit statuses in --help, one line and no traceback for user errors, quiet on a
closed pipe, one spelling of the DKIM algorithm accepted in sign and keygen alike; and
`mta config show` (with and without --changed) round-tripping through the loader.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port

from mta.config import load_config, parse_config
from mta.config.show import render
from mta.dkim.signer import keygen

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _mta(*args: str, cwd: Path, stdin: bytes | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], cwd=cwd, env=ENV, input=stdin,
                          capture_output=True, timeout=timeout)


def _closed_pipe(*args: str, cwd: Path) -> tuple[int, bytes]:
    """Run `mta ARGS` with stdout a pipe whose reader is already gone; (status, stderr)."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "mta", *args], cwd=cwd, env=ENV,
                              stdout=w, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(w)
    return proc.returncode, proc.stderr


def _rich_config(tmp: Path) -> Path:
    key = tmp / "k.pem"
    key.write_bytes(keygen("ed25519")[0])
    shaping = tmp / "shaping.toml"
    shaping.write_text("")
    cfg = tmp / "rich.toml"
    cfg.write_text(f"""
[server]
hostname = "mx.rich.test"
data_memory_wait = "90s"
[spool]
directory = "spool"
segment_size = "3MiB"
hot_cache = 1234567
[log]
directory = "{tmp}/log"
mode = "0600"
[[listener]]
address = "127.0.0.1"
port = {free_port()}
max_message_size = "10MB"
idle_timeout = "1500ms"
relay_cidrs = ["10.0.0.0/8"]
[[listener]]
address = "::1"
port = {free_port()}
hostname = "other.rich.test"
[delivery]
routes = {{"example.test" = "127.0.0.1:2600", "*.sub.test" = "[::1]:2601"}}
retry_initial = "1h30m"
max_age = 3.5
[egress]
shaping = ["shaping.toml"]
default_pool = "main"
[[source]]
name = "ip1"
address = "127.0.0.1"
[[source]]
name = "ip2"
address = "127.0.0.2"
ehlo_name = "ip2.rich.test"
[[pool]]
name = "main"
sources = ["ip1", {{source = "ip2", weight = 3}}]
[[queue_class]]
name = "news"
weight = 2
max_message_rate = "100/5m"
[[egress_rule]]
tenant = "acme"
queue_class = "news"
[dns]
nameservers = ["127.0.0.1:9", "[::1]:53"]
[admin]
listen = ""
[[dkim]]
domain = "rich.test"
selector = "s1"
key_file = "k.pem"
oversign = []
[bounces]
domain = "bounces.rich.test"
trusted_fbl_sources = ["192.0.2.0/24"]
[unsubscribe]
listen = "127.0.0.1:{free_port()}"
base_url = "https://unsub.rich.test"
""")
    return cfg


@pytest.mark.parametrize("changed", [False, True], ids=["all", "changed"])
def test_config_show_round_trips(tmp_path, changed):
    cfg = load_config(_rich_config(tmp_path))
    text = render(cfg, changed=changed)
    again = parse_config(text, base_dir=tmp_path)
    assert dataclasses.replace(again, origin=cfg.origin) == cfg, text


@pytest.mark.parametrize("example", [ROOT / "docs" / "examples" / "sender.toml",
                                     ROOT / "mta" / "config" / "default.toml"],
                         ids=lambda p: p.name)
def test_config_show_round_trips_the_examples(example):
    cfg = load_config(example)
    for changed in (False, True):
        again = parse_config(render(cfg, changed=changed), base_dir=example.parent)
        assert dataclasses.replace(again, origin=cfg.origin) == cfg, (example, changed)


def test_config_show_changed_lists_only_changes(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text('[server]\nhostname = "a.test"\n[delivery]\nmax_age = "2d"\n')
    r = _mta("config", "show", "--changed", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    body = [ln for ln in r.stdout.decode().splitlines() if ln and not ln.startswith("#")]
    assert body == ["[server]", 'hostname = "a.test"', "[delivery]", 'max_age = "2d"'], body
    full = _mta("config", "show", "-c", str(cfg), cwd=tmp_path).stdout.decode()
    assert 'ehlo_name = "a.test"' in full and 'connection_limit = 32' in full
    assert 'max_age = "2d"' in full and f'directory = "{tmp_path}/var/spool"' in full


def test_common_options_anywhere(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nhostname = "anywhere.test"\n')
    spool = tmp_path / "elsewhere"
    outputs = set()
    for args in (["-c", str(cfg), "--spool-dir", str(spool), "config", "show"],
                 ["config", "show", "-c", str(cfg), "--spool-dir", str(spool)],
                 ["config", "-c", str(cfg), "show", "--spool-dir", str(spool)],
                 ["--spool-dir", str(spool), "config", "show", "--config", str(cfg)]):
        r = _mta(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
        outputs.add(r.stdout)
    (out,) = outputs
    assert b'hostname = "anywhere.test"' in out and f'"{spool}"'.encode() in out
    # a flag given after the subcommand wins over one given before it
    r = _mta("--hold", "config", "show", "--changed", cwd=tmp_path)
    assert b"hold = true" in r.stdout, r.stdout


def test_version_and_exit_statuses_in_help(tmp_path):
    import mta
    r = _mta("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode().strip() == f"mta {mta.__version__}"
    r = _mta("--help", cwd=tmp_path)
    assert r.returncode == 0
    text = r.stdout.decode()
    for line in ("exit status:", "  0 ", "  1 ", "  2 ", "  3 ", "  141 "):
        assert line in text, text


@pytest.mark.parametrize("args,status,text", [
    (["no-such-command"], 2, "invalid choice"),
    (["spool", "ls", "--bogus"], 2, "unrecognized arguments"),
    (["-c", "/nonexistent/mta.toml", "check-config"], 1, "/nonexistent/mta.toml: cannot read"),
    (["spool", "ls", "--spool-dir", "/nonexistent/spool"], 1, "/nonexistent/spool"),
    (["queue", "summary", "--admin", ""], 3, "admin API is disabled"),
    (["bounce", "parse", "/nonexistent/msg.eml"], 1, "cannot read /nonexistent/msg.eml"),
    (["queue", "inspect"], 2, "needs a message id"),
    (["suspend", "queue", "q", "--for", "soon"], 2, "mta suspend --for"),
], ids=["usage", "unknown-flag", "config", "spool", "admin-off", "bounce-file", "queue-usage",
        "suspend-usage"])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, status, text):
    r = _mta(*args, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == status, (r.returncode, err)
    assert text in err and "Traceback" not in err, err


def test_daemon_unreachable_is_status_3(tmp_path):
    """A token but no daemon on the port: one line naming the address, status 3."""
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[spool]\ndirectory = "{tmp_path}/spool"\n'
                   f'[admin]\nlisten = "127.0.0.1:{port}"\n')
    r = _mta("queue", "count", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 3 and b"no admin token" in r.stderr, r.stderr
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "admin.token").write_text("a" * 64)
    r = _mta("-c", str(cfg), "queue", "summary", cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 3 and f"127.0.0.1:{port}" in err and "Traceback" not in err, err


def test_closed_pipe_is_quiet(tmp_path):
    status, err = _closed_pipe("config", "show", cwd=tmp_path)
    assert status == 141 and err == b"", (status, err)
    for args in (["--help"], ["dkim", "--help"]):   # argparse drops help it cannot write
        status, err = _closed_pipe(*args, cwd=tmp_path)
        assert status in (0, 141) and err == b"", (args, status, err)


def test_dkim_algorithm_spellings_and_verify_mismatch(tmp_path):
    for spelling, n in (("rsa", 1), ("rsa-sha256", 2), ("ed25519", 3), ("ed25519-sha256", 4)):
        r = _mta("dkim", "keygen", "--domain", "ex.test", "--selector", f"s{n}", "--algorithm",
                 spelling, "--bits", "1024", "--out", f"k{n}.pem", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        kind = "rsa" if spelling.startswith("rsa") else "ed25519"
        assert f"k={kind};".encode() in r.stdout
    msg = b"From: a@ex.test\r\nTo: b@ex.test\r\nSubject: hi\r\n\r\nbody\r\n"
    for spelling in ("rsa", "rsa-sha256"):
        r = _mta("dkim", "sign", "--domain", "ex.test", "--selector", "s1", "--key", "k1.pem",
                 "--algorithm", spelling, cwd=tmp_path, stdin=msg)
        assert r.returncode == 0 and b"a=rsa-sha256;" in r.stdout, r.stderr
    signed = r.stdout
    r = _mta("dkim", "sign", "--domain", "ex.test", "--selector", "s1", "--key", "k1.pem",
             "--algorithm", "dsa", cwd=tmp_path, stdin=msg)
    assert r.returncode == 2 and b"rsa-sha256" in r.stderr
    # the key record of another key type: a one-line fail, status 1, no traceback
    ed_record = _mta("dkim", "keygen", "--domain", "ex.test", "--selector", "s9",
                     "--algorithm", "ed25519", "--out", "k9.pem", cwd=tmp_path).stdout.decode()
    record = ed_record.split('"', 1)[1].rsplit('"', 1)[0].replace('" "', "")
    r = _mta("dkim", "verify", "--key-record", record, cwd=tmp_path, stdin=signed)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert len(out.splitlines()) == 1 and ": fail (" in out, out
    tampered = signed.replace(b"body", b"bodY")
    rsa_record = _mta("dkim", "keygen", "--domain", "ex.test", "--selector", "s8",
                      "--out", "k8.pem", cwd=tmp_path).stdout.decode()
    assert "k=rsa" in rsa_record
    r = _mta("dkim", "verify", "--key-record", record, cwd=tmp_path, stdin=tampered)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
