"""`mta check-config` refuses what `mta serve` refuses, warns on what fails at delivery.

Each refusal case runs both commands as subprocesses on the same config: check-config
must exit 1 with a line naming the file and the problem, and serve must refuse to start
(exit non-zero, never "mta: ready"), so the two stay one code path (mta/preflight.py
builds the pieces through mta/server.py's functions). Warnings exit 0 with "warning:"
lines on stderr. check-config must create nothing: no spool, no log, no suppression
store or key, no admin token.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port

from mta.dkim.signer import keygen


def _config(tmp: Path, extra: str = "", listener: str = "") -> Path:
    cfg = tmp / "mta.toml"
    cfg.write_text(
        f'[spool]\ndirectory = "{tmp}/spool"\n[log]\ndirectory = "{tmp}/log"\n'
        f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[suppression]\nstore = "{tmp}/supp/s.sqlite"\nkey_file = "{tmp}/supp/s.key"\n'
        f'{extra}\n[[listener]]\naddress = "127.0.0.1"\nport = {free_port()}\n{listener}\n')
    return cfg


def _mta(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mta", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _serve_refuses(cfg: Path, tmp: Path) -> str:
    """Start serve on the config; it must exit by itself with an error. Its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c", str(cfg)], cwd=tmp,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("serve started on a config check-config refuses")
    assert "mta: ready" not in out and proc.returncode != 0, (proc.returncode, out, err)
    return err


def _dkim(tmp: Path, key_file: Path) -> str:
    return (f'[[dkim]]\ndomain = "example.test"\nselector = "s1"\n'
            f'key_file = "{key_file}"\n')


def _public_only(tmp: Path) -> Path:
    import base64
    _, public = keygen("rsa", 1024)
    p = tmp / "public.pem"
    body = "\n".join(public[i:i + 64] for i in range(0, len(public), 64))
    p.write_text(f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n")
    base64.b64decode(public)   # it is a real public key
    return p


def _garbage(tmp: Path, name: str, text: str = "this is = = not it\n") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


# (case, builder of the [section] text given tmp, what the error line names)
REFUSALS = [
    ("dkim key missing", lambda t: _dkim(t, t / "nokey.pem"), "nokey.pem"),
    ("dkim key garbage", lambda t: _dkim(t, _garbage(t, "garbage.pem")), "garbage.pem"),
    ("dkim key public only", lambda t: _dkim(t, _public_only(t)), "public.pem"),
    ("bounce rules missing", lambda t: f'[bounces]\nrules = ["{t}/norules.toml"]\n',
     "norules.toml"),
    ("bounce rules garbage",
     lambda t: f'[bounces]\nrules = ["{_garbage(t, "rules.toml")}"]\n', "rules.toml"),
    ("shaping file missing", lambda t: f'[egress]\nshaping = ["{t}/noshaping.toml"]\n',
     "noshaping.toml"),
    ("shaping file garbage",
     lambda t: f'[egress]\nshaping = ["{_garbage(t, "shaping.toml")}"]\n', "shaping.toml"),
    ("pool hook missing", lambda t: '[egress]\npool_hook = "no_such_module_h1:pick"\n',
     "no_such_module_h1"),
    ("unsubscribe cert missing",
     lambda t: f'[unsubscribe]\nlisten = "127.0.0.1:{free_port()}"\n'
               f'tls_cert = "{t}/nocert.pem"\ntls_key = "{t}/nokey.pem"\n', "nocert.pem"),
    ("suppression key garbage",
     lambda t: (t / "supp").mkdir() or (t / "supp" / "s.key").write_bytes(b"short") and "",
     "s.key"),
    ("admin token garbage",
     lambda t: (t / "spool").mkdir() or (t / "spool" / "admin.token").write_text("x y") and "",
     "admin.token"),
    ("admin on the listener's port", None, "admin.listen"),
    ("listener address not on this host", None, "192.0.2.1"),
]


@pytest.mark.parametrize("case,build,named", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_check_config_refuses_what_serve_refuses(tmp_path, case, build, named):
    if case == "admin on the listener's port":
        port = free_port()
        cfg = tmp_path / "mta.toml"
        cfg.write_text(f'[spool]\ndirectory = "{tmp_path}/spool"\n[log]\ndirectory = '
                       f'"{tmp_path}/log"\n[admin]\nlisten = "127.0.0.1:{port}"\n'
                       f'[[listener]]\naddress = "127.0.0.1"\nport = {port}\n')
    elif case == "listener address not on this host":
        cfg = _config(tmp_path, listener=f'[[listener]]\naddress = "192.0.2.1"\n'
                                         f'port = {free_port()}\n')
    else:
        cfg = _config(tmp_path, build(tmp_path))
    r = _mta("check-config", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if named in ln]
    assert lines, f"no line names {named!r}: {r.stderr!r}"
    assert all(ln.startswith(str(cfg)) for ln in lines), r.stderr
    assert "OK" not in r.stdout
    err = _serve_refuses(cfg, tmp_path)
    assert "Traceback" not in err, err


def _created(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


def test_ok_config_passes_and_creates_nothing(tmp_path):
    key = tmp_path / "dkim.pem"
    key.write_bytes(keygen("ed25519")[0])
    rules = _garbage(tmp_path, "rules.toml", "")
    cfg = _config(tmp_path, _dkim(tmp_path, key) + f'[bounces]\ndomain = "bounces.test"\n'
                  f'rules = ["{rules}"]\n')
    before = _created(tmp_path)
    r = _mta("check-config", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{cfg}: OK"), r.stdout
    assert _created(tmp_path) == before, "check-config wrote into the daemon's directories"


def test_existing_suppression_key_is_checked_not_replaced(tmp_path):
    (tmp_path / "supp").mkdir()
    (tmp_path / "supp" / "s.key").write_bytes(os.urandom(32))
    key = (tmp_path / "supp" / "s.key").read_bytes()
    cfg = _config(tmp_path)
    r = _mta("check-config", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "supp" / "s.key").read_bytes() == key
    assert not (tmp_path / "supp" / "s.sqlite").exists()


def test_source_not_on_this_host_is_a_warning(tmp_path):
    cfg = _config(tmp_path, '[[source]]\nname = "far"\naddress = "192.0.2.7"\n'
                            '[[source]]\nname = "near"\naddress = "127.0.0.1"\n')
    r = _mta("check-config", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and "192.0.2.7" in warnings[0] and "'far'" in warnings[0], r.stderr
    assert warnings[0].startswith(f"{cfg}: warning:"), warnings


def test_unknown_source_in_shaping_file_is_a_warning(tmp_path):
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('[default.sources.ip1]\nconnection_limit = 5\n'
                       '[provider.big]\nmatch = ["*.big.test"]\n'
                       '[provider.big.sources.ghost]\nconnection_limit = 2\n')
    cfg = _config(tmp_path, f'[egress]\nshaping = ["{shaping}"]\n'
                            '[[source]]\nname = "ip1"\naddress = "127.0.0.1"\n')
    r = _mta("check-config", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning:" in ln]
    assert len(warnings) == 1, r.stderr
    assert "ghost" in warnings[0] and str(shaping) in warnings[0] and "provider big" in warnings[0]


def test_config_errors_are_one_line_each_without_traceback(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[spool]\nsegment_size = "1KiB"\nnonsense = 1\n')
    r = _mta("check-config", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all(ln.startswith(f"{cfg}: spool.") for ln in lines), lines


def test_preflight_in_process_matches(tmp_path):
    """The module API: check() returns the same errors without a subprocess."""
    from mta.config import load_config
    from mta.preflight import check
    cfg = load_config(_config(tmp_path, _dkim(tmp_path, tmp_path / "missing.pem")
                              + f'[bounces]\nrules = ["{tmp_path}/missing.toml"]\n'))
    report = check(cfg)
    assert len(report.errors) == 2, report.errors
    assert any("missing.pem" in e for e in report.errors)
    assert any("missing.toml" in e for e in report.errors)
