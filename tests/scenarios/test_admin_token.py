"""The admin API's bearer token, with real daemons (`mta serve` subprocesses).

Each daemon creates its token file at start ([admin] token_file, default
<spool>/admin.token, 0600, 64 hex characters); every request without that token gets 401;
`mta` commands read address and token from their config, so two daemons on different
admin ports each answer their own commands, and a command pointed at the other daemon
(--admin) is refused with status 3. Also the closed-pipe convention on commands whose
output comes from a daemon or its spool.
"""
from __future__ import annotations

import http.client
import os
import stat
import subprocess
import sys

import orjson

from conftest import ROOT
from peers import _records, _send

HOLD = "[delivery]\nhold = true\n"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _mta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], env=ENV, capture_output=True,
                          text=True, timeout=60)


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def test_each_command_reaches_its_own_daemon(daemon_factory):
    d0 = daemon_factory(extra=HOLD)
    d1 = daemon_factory(extra=HOLD)
    _send(d0.port, "a@sender.test", ["x@example.test"])
    for _ in range(2):
        _send(d1.port, "a@sender.test", ["y@example.test"])
    _records(d0, "Reception", 1)
    _records(d1, "Reception", 2)
    tokens = []
    for d in (d0, d1):
        path = d.spool_dir / "admin.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) == 64 and int(token, 16) >= 0
        tokens.append(token)
    assert tokens[0] != tokens[1]
    for d, want in ((d0, "1"), (d1, "2")):
        r = _mta("queue", "count", "-c", str(d.config))
        assert (r.returncode, r.stdout.strip()) == (0, want), (r.returncode, r.stdout, r.stderr)
        r = _mta("-c", str(d.config), "queue", "count")   # -c before the subcommand
        assert (r.returncode, r.stdout.strip()) == (0, want), r.stderr
    # d0's config and token against d1's port: refused, status 3, one line
    r = _mta("queue", "count", "-c", str(d0.config), "--admin", f"127.0.0.1:{d1.admin_port}")
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "refused the token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_requests_without_the_token_get_401(daemon):
    token = (daemon.spool_dir / "admin.token").read_text().strip()
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64},
                    {"Authorization": token}, {"Authorization": "Basic " + token}):
        status, body = _get(daemon.admin_port, "/queue/summary", headers)
        assert status == 401 and "unauthorized" in body["error"], (headers, status, body)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.admin_port, timeout=10)
    conn.request("POST", "/control/suspend", orjson.dumps({"kind": "site", "name": "x"}),
                 {"Content-Type": "application/json"})
    assert conn.getresponse().status == 401
    conn.close()
    status, body = _get(daemon.admin_port, "/queue/summary",
                        {"Authorization": f"Bearer {token}"})
    assert status == 200 and "outcomes" in body, body
    # the token survives a restart: a command started before keeps working
    daemon.stop()
    daemon.start()
    assert (daemon.spool_dir / "admin.token").read_text().strip() == token
    assert _mta("queue", "count", "-c", str(daemon.config)).returncode == 0


def test_token_file_from_the_config(daemon_factory, tmp_path):
    token_file = tmp_path / "secrets" / "mta-admin.token"
    d = daemon_factory(extra=f'[admin]\nlisten = "127.0.0.1:0"\ntoken_file = "{token_file}"\n',
                       start=False)
    # the conftest daemon gives the admin API a free port unless [admin] is in extra
    text = d.config.read_text().replace('listen = "127.0.0.1:0"',
                                        f'listen = "127.0.0.1:{d.admin_port}"')
    d.config.write_text(text)
    d.start()
    assert token_file.exists() and not (d.spool_dir / "admin.token").exists()
    r = _mta("queue", "count", "-c", str(d.config))
    assert (r.returncode, r.stdout.strip()) == (0, "0"), r.stderr


def _closed_pipe(*args: str) -> tuple[int, bytes]:
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "mta", *args], env=ENV, stdout=w,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(w)
    return proc.returncode, proc.stderr


def test_closed_pipe_after_daemon_output(daemon_factory):
    d = daemon_factory(extra=HOLD)
    for i in range(3):
        _send(d.port, "a@sender.test", [f"r{i}@example.test"])
    _records(d, "Reception", 3)
    status, err = _closed_pipe("queue", "summary", "-c", str(d.config))
    assert status == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err
    d.stop()
    status, err = _closed_pipe("spool", "ls", "-c", str(d.config))
    assert status == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err
    # `| head -1` for real: the first line arrives, the rest is dropped quietly
    proc = subprocess.run(f"{sys.executable} -m mta spool ls -c {d.config} | head -1",
                          shell=True, env=ENV, capture_output=True, timeout=60)
    assert len(proc.stdout.splitlines()) == 1 and b"Traceback" not in proc.stderr, proc.stderr
