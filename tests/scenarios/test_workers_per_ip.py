"""Per-client-IP limits hold for the node, not per worker (mta/ingest/peer_table.py):
`mta serve` with [server] workers = 2 (a real supervisor and two worker processes sharing
the listener port through SO_REUSEPORT, which spreads one client's connections over both).

The attacker tests: with each worker counting alone, a client got 2 x max_connections_per_ip
connections and 2 x auth_max_failures password guesses per lockout window.
"""
from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time

import orjson

from tlspki import add_user, make_certs

ADDR = "127.0.122.1"
CLIENT = "127.0.122.5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def _daemon(daemon_factory, listener: str):
    d = daemon_factory(listener=listener, extra="[delivery]\nhold = true\n", start=False)
    text = d.config.read_text().replace("[server]\n", "[server]\nworkers = 2\nnode = \"n1\"\n", 1)
    d.config.write_text(text)
    return d.start(timeout=40)


def _records(d, index: int, rtype: str) -> list[dict]:
    path = d.log_dir / f"mta.w{index}.jsonl"
    if not path.exists():
        return []
    out = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return [r for r in out if r["type"] == rtype]


def _wait_records(d, rtype: str, n: int, timeout: float = 20) -> list[list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        got = [_records(d, i, rtype) for i in (0, 1)]
        if sum(map(len, got)) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_max_connections_per_ip_holds_over_both_workers(daemon_factory):
    port = _free_port()
    d = _daemon(daemon_factory, f'[[listener]]\naddress = "{ADDR}"\nport = {port}\n'
                                f'max_connections_per_ip = 4\n')
    # the port is the node's: ask until the supervisor's workers both listen
    sent = 0
    for _ in range(5):
        socks, greetings = [], []
        for _ in range(16):
            s = socket.create_connection((ADDR, port), timeout=10, source_address=(CLIENT, 0))
            socks.append(s)
            greetings.append(s.recv(512))
        accepted = [s for s, g in zip(socks, greetings) if g.startswith(b"220")]
        refused = [g for g in greetings if not g.startswith(b"220")]
        assert len(accepted) == 4, greetings
        assert all(g.startswith(b"421 4.7.0") for g in refused), refused
        for s in accepted:    # one message on each: its worker's log says where it landed
            s.sendall(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@c.example>\r\n"
                      b"DATA\r\n")
            buf = b""
            while buf.count(b"\r\n354") < 1:
                chunk = s.recv(4096)
                assert chunk, buf
                buf += chunk
            s.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            while (chunk := s.recv(4096)):
                buf += chunk
            assert b"250 2.0.0" in buf and b"221" in buf, buf
            sent += 1
        for s in socks:
            s.close()
        time.sleep(0.3)     # the workers see the closes before the next round
    per_worker = _wait_records(d, "Reception", sent)
    assert sum(map(len, per_worker)) == sent == 20
    assert all(per_worker), [len(r) for r in per_worker]   # both workers took this client


def _auth(port: int, ca, password: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False          # the certificate names a host, we dial an address
    with smtplib.SMTP(ADDR, port, timeout=20, source_address=(CLIENT, 0)) as s:
        s.starttls(context=ctx)
        s.ehlo("c.example")
        token = base64.b64encode(b"\0alice\0" + password.encode()).decode()
        return s.docmd("AUTH", "PLAIN " + token)


def test_auth_failures_lock_the_client_out_on_every_worker(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki")
    users = tmp_path / "users.json"
    add_user(users, "alice", "correct horse", "t", "*")
    port = _free_port()
    d = _daemon(daemon_factory, f'[[listener]]\naddress = "{ADDR}"\nport = {port}\n'
                                f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
                                f'auth_max_failures = 12\nauth_lockout = "10m"\n')
    for _ in range(12):     # a new connection each: SO_REUSEPORT spreads them (all 12 on
        code, _ = _auth(port, ca, "wrong")     # one worker: 1 run in 2,048)
        assert code == 535
    failed = _wait_records(d, "Rejection", 12)
    assert all(failed), [len(r) for r in failed]           # both workers saw failures
    for _ in range(4):      # whichever worker takes the connection: locked out
        code, text = _auth(port, ca, "correct horse")
        assert code == 454, text
