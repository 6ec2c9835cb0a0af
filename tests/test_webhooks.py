"""Event webhooks (mta/logs/hooks.py) against a real HTTP server (http.server, HTTP/1.1
keep-alive, in a thread on 127.0.0.1): records filtered by type and tenant, in file order,
nothing lost while the hook fails and recovers, dedupe by batch id; a restart resumes at
the cursor and repeats only the batch in flight, with its id; logrotate renames; a cursor
whose file is gone; max_lag; https verified against ca_file; the Authorization file.

`HookReceiver` is also the receiver of tests/scenarios/test_webhook_delivery.py.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from mta.config import ConfigError, parse_config
from mta.logs.hooks import Hook, HookError, build_webhooks
from mta.logs.writer import LogWriter
from mta.model.log_records import RecordType


class HookReceiver:
    """An HTTP server that takes batches: answers `status` (default 200) until told
    otherwise, or `hang` (never answers). Records (batch id, headers, records) in order."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.batches: list[tuple[str, dict[str, str], list[dict]]] = []
        self.requests = 0
        self.status = 200
        self.hang = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:   # noqa: N802  (http.server's name)
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with receiver.lock:
                    receiver.requests += 1
                    status = receiver.status
                if receiver.hang.is_set():
                    time.sleep(3600)      # never answers (the daemon's timeout cuts it)
                if status == 200:
                    with receiver.lock:
                        receiver.batches.append((self.headers.get("X-MTA-Batch-Id", ""),
                                                 dict(self.headers), orjson.loads(body)))
                reply = b'{"ok": true}' if status == 200 else b"try later"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook?x=1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def records(self, dedupe: bool = True) -> list[dict]:
        """Every record received, in arrival order; a batch id seen before is skipped."""
        seen: set[str] = set()
        out: list[dict] = []
        with self.lock:
            for bid, _, recs in self.batches:
                if dedupe and bid in seen:
                    continue
                seen.add(bid)
                out += recs
        return out

    def wait(self, pred, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {len(self.records())} records")


@pytest.fixture
def receiver():
    made: list[HookReceiver] = []

    def make(**kw) -> HookReceiver:
        r = HookReceiver(**kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.hang.clear()
        r.close()


@dataclass
class Settings:
    name: str
    url: str
    record_types: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    batch_size: int = 50
    max_batch_bytes: int = 1 << 20
    batch_interval: float = 0.05
    timeout: float = 5.0
    max_retry_interval: float = 0.3
    max_lag: int = 0
    authorization_file: object = None
    ca_file: object = None


def _hook(tmp_path: Path, url: str, **kw) -> Hook:
    hooks = build_webhooks([Settings("h", url, **kw)], str(tmp_path / "log" / "mta.jsonl"),
                           str(tmp_path / "state"), "mx.test")
    return hooks.hooks[0]


def _log(w: LogWriter, start: int, n: int) -> None:
    """n records, numbered: Reception, Delivery, Bounce, Backoff in turn; tenants t0..t2."""
    kinds = [RecordType.RECEPTION, RecordType.DELIVERY, RecordType.BOUNCE, RecordType.BACKOFF]
    for i in range(start, start + n):
        w.log(kinds[i % 4], n=i, id=f"m{i // 4}", tenant=f"t{i % 3}", pad="p" * (i % 50))


def _wanted(n: int, types=("Delivery", "Bounce"), tenants=("t1",)) -> list[int]:
    kinds = ["Reception", "Delivery", "Bounce", "Backoff"]
    return [i for i in range(n) if kinds[i % 4] in types and f"t{i % 3}" in tenants]


async def _until(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_filtered_batches_in_order_through_failures(tmp_path, receiver):
    r = receiver()
    r.status = 500                                   # failing at first
    auth = tmp_path / "auth"
    auth.write_text("Bearer s3cret\n")
    auth.chmod(0o600)
    hook = _hook(tmp_path, r.url, record_types=("Delivery", "Bounce"), tenants=("t1",),
                 authorization_file=auth)

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.01)
        hook.start(asyncio.get_running_loop())
        for k in range(10):
            _log(w, k * 300, 300)
            await asyncio.sleep(0.05)
            if k == 5:
                await _until(lambda: r.requests >= 3)   # a few refused tries
                r.status = 200                          # ... then it recovers
        w.flush()
        want = _wanted(3000)
        await _until(lambda: hook.sent_records >= len(want))   # acknowledged
        await hook.stop()
        w.close()

    asyncio.run(main())
    got = [rec["n"] for rec in r.records()]
    assert got == _wanted(3000)                       # all, once, in file order
    assert all(rec["type"] in ("Delivery", "Bounce") and rec["tenant"] == "t1"
               for rec in r.records())
    assert max(len(recs) for _, _, recs in r.batches) <= 50
    _, headers, recs = r.batches[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["X-MTA-Hook"] == "h" and headers["X-MTA-Batch-Records"] == str(len(recs))
    assert headers["Content-Type"] == "application/json"
    stats = hook.stats()
    assert stats["failed_attempts"] >= 3 and not stats["failing"]
    assert stats["sent_records"] == len(_wanted(3000))


def test_restart_resumes_at_the_cursor_repeating_only_the_batch_in_flight(tmp_path, receiver):
    r = receiver()

    async def run_until(n_records: int, then_fail: bool) -> None:
        hook = _hook(tmp_path, r.url, batch_size=20)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: len(r.records()) >= n_records)
        if not then_fail:
            await _until(lambda: hook.lag() == 0)     # the last batch acknowledged
        if then_fail:
            r.status = 503                           # the next batch is refused ...
            base = r.requests
            await _until(lambda: r.requests >= base + 2)
        await hook.stop()                            # ... and the "daemon" stops

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.01)
        _log(w, 0, 1000)
        w.flush()
        await asyncio.sleep(0.1)
        await run_until(200, then_fail=True)
        r.status = 200
        _log(w, 1000, 500)
        w.flush()
        await run_until(1500, then_fail=False)       # a new hook: from the cursor
        w.close()

    asyncio.run(main())
    assert [rec["n"] for rec in r.records()] == list(range(1500))
    total = [rec["n"] for rec in r.records(dedupe=False)]
    assert len(total) == 1500                         # refused tries were never taken
    ids = [bid for bid, _, _ in r.batches]
    assert len(ids) == len(set(ids))
    cursor = orjson.loads((tmp_path / "state" / "h.cursor").read_bytes())
    assert cursor["batch"] is None and cursor["offset"] == (tmp_path / "log" / "mta.jsonl").stat().st_size


def test_batch_in_flight_at_a_crash_is_sent_again_with_its_id(tmp_path, receiver):
    """The cursor names the batch before it leaves: a batch the receiver took but whose
    reply never came back is rebuilt from the same bytes, with the same id."""
    r = receiver()

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.01)
        _log(w, 0, 100)
        w.flush()
        await asyncio.sleep(0.05)
        r.hang.set()                                  # takes the request, never answers
        hook = _hook(tmp_path, r.url, batch_size=30)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: r.requests >= 1)
        await asyncio.sleep(0.2)
        await hook.stop()                             # "crash" with the batch in flight
        saved = orjson.loads((tmp_path / "state" / "h.cursor").read_bytes())
        assert saved["offset"] == 0 and saved["batch"]["id"]
        r.hang.clear()
        r.batches.append((saved["batch"]["id"], {}, []))   # as if the receiver had stored it
        hook = _hook(tmp_path, r.url, batch_size=10)  # even a changed batch_size ...
        hook.start(asyncio.get_running_loop())
        await _until(lambda: len(r.records(dedupe=False)) >= 100)
        await hook.stop()
        first = r.batches[1]
        assert first[0] == saved["batch"]["id"] and len(first[2]) == 30   # ... same batch
        w.close()

    asyncio.run(main())
    assert [rec["n"] for rec in r.records(dedupe=False)] == list(range(100))


def test_logrotate_rename_loses_nothing(tmp_path, receiver):
    r = receiver()
    hook = _hook(tmp_path, r.url, batch_size=40)

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        hook.start(asyncio.get_running_loop())
        n = 0
        for round_ in range(3):
            _log(w, n, 400)
            n += 400
            await asyncio.sleep(0.02)
            os.rename(tmp_path / "log" / "mta.jsonl", tmp_path / "log" / f"mta.jsonl.{round_}")
            _log(w, n, 100)                           # still into the renamed file
            n += 100
            await asyncio.sleep(0.05)
            w.reopen()                                # the postrotate SIGUSR1
            _log(w, n, 100)
            n += 100
        w.flush()
        await _until(lambda: len(r.records()) >= n)
        await hook.stop()
        w.close()

    asyncio.run(main())
    assert [rec["n"] for rec in r.records(dedupe=False)] == list(range(1800))


def test_restart_after_rotations_reads_the_rotated_files_first(tmp_path, receiver, caplog):
    r = receiver()

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        _log(w, 0, 100)
        w.flush()
        await asyncio.sleep(0.05)
        hook = _hook(tmp_path, r.url, batch_size=1000)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: len(r.records()) >= 100)
        await hook.stop()
        for k in range(2):                            # two rotations while it is down
            _log(w, 100 + 100 * k, 100)
            w.flush()
            await asyncio.sleep(0.05)
            for j in (1, 0):
                src = tmp_path / "log" / (f"mta.jsonl.{j}" if j else "mta.jsonl")
                if src.exists():
                    os.rename(src, tmp_path / "log" / f"mta.jsonl.{j + 1}")
            w.reopen()
        _log(w, 300, 100)
        w.flush()
        hook = _hook(tmp_path, r.url, batch_size=1000)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: len(r.records()) >= 400)
        await hook.stop()
        w.close()

    asyncio.run(main())
    assert [rec["n"] for rec in r.records(dedupe=False)] == list(range(400))


def test_a_cursor_whose_file_is_gone_starts_at_the_current_file(tmp_path, receiver, caplog):
    r = receiver()

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        _log(w, 0, 50)
        w.flush()
        await asyncio.sleep(0.05)
        hook = _hook(tmp_path, r.url)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: len(r.records()) >= 50)
        await hook.stop()
        _log(w, 50, 50)                               # never shipped: rotated and deleted
        w.flush()
        os.rename(tmp_path / "log" / "mta.jsonl", tmp_path / "log" / "old")
        w.reopen()
        os.unlink(tmp_path / "log" / "old")
        _log(w, 100, 50)
        w.flush()
        hook = _hook(tmp_path, r.url)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: len(r.records()) >= 100)
        await hook.stop()
        w.close()

    asyncio.run(main())
    assert [rec["n"] for rec in r.records()] == list(range(50)) + list(range(100, 150))
    assert "is gone" in caplog.text and "were not sent" in caplog.text


def test_max_lag_skips_to_the_end_and_says_so(tmp_path, receiver, caplog):
    r = receiver()
    r.status = 500

    async def main() -> Hook:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        hook = _hook(tmp_path, r.url, max_lag=20000, max_retry_interval=0.1)
        hook.start(asyncio.get_running_loop())
        _log(w, 0, 400)                               # ~40 KB: over the bound while failing
        w.flush()
        await _until(lambda: hook.skipped_bytes > 0)
        r.status = 200
        _log(w, 400, 40)
        w.flush()
        await _until(lambda: any(rec["n"] >= 400 for rec in r.records()))
        await _until(lambda: r.records()[-1]["n"] == 439)
        await hook.stop()
        w.close()
        return hook

    hook = asyncio.run(main())
    got = [rec["n"] for rec in r.records()]
    assert got[-40:] == list(range(400, 440))
    assert len(got) < 440
    assert "over max_lag" in caplog.text and "NOT sent" in caplog.text
    assert hook.stats()["skipped_bytes"] > 20000


def _cert(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hook.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_is_verified(tmp_path, receiver):
    cert, key = _cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    r = receiver(tls=ctx)

    async def main() -> tuple[dict, dict]:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        _log(w, 0, 20)
        w.flush()
        untrusted = _hook(tmp_path / "a", r.url)      # the system store does not know it
        untrusted.log_path = w.path
        untrusted.start(asyncio.get_running_loop())
        await _until(lambda: untrusted.failed_attempts >= 1)
        await untrusted.stop()
        trusted = _hook(tmp_path / "b", r.url, ca_file=cert)
        trusted.log_path = w.path
        trusted.start(asyncio.get_running_loop())
        await _until(lambda: trusted.sent_records >= 20)
        await trusted.stop()
        w.close()
        return untrusted.stats(), trusted.stats()

    bad, good = asyncio.run(main())
    assert "TLS" in bad["last_error"] and "certificate verify failed" in bad["last_error"].lower()
    assert bad["sent_records"] == 0 and good["sent_records"] == 20


def test_authorization_file_must_be_private(tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("Bearer x\n")
    auth.chmod(0o640)
    with pytest.raises(HookError, match="chmod 600"):
        build_webhooks([Settings("h", "http://127.0.0.1:1/", authorization_file=auth)],
                       str(tmp_path / "mta.jsonl"), str(tmp_path))
    auth.chmod(0o600)
    auth.write_text("Bearer x\r\nX-Injected: 1\n")
    with pytest.raises(HookError, match="printable"):
        build_webhooks([Settings("h", "http://127.0.0.1:1/", authorization_file=auth)],
                       str(tmp_path / "mta.jsonl"), str(tmp_path))


def test_config_keys(tmp_path):
    base = f'[[listener]]\nport = 1\n[spool]\ndirectory = "{tmp_path}"\n'
    cfg = parse_config(base + '[[webhook]]\nname = "ops"\nurl = "https://hooks.example/x"\n'
                       'record_types = ["Delivery", "Bounce"]\ntenants = ["acme"]\n'
                       'batch_interval = "250ms"\n')
    (w,) = cfg.webhook
    assert (w.name, w.record_types, w.tenants, w.batch_interval) == (
        "ops", ("Delivery", "Bounce"), ("acme",), 0.25)
    for bad, why in (('url = "https://u:p@h.example/"', "authorization_file"),
                     ('url = "ftp://h.example/"', "http"),
                     ('url = "https://h.example/"\nrecord_types = ["Delivered"]', "not a log record type")):
        with pytest.raises(ConfigError, match=why):
            parse_config(base + f'[[webhook]]\nname = "x"\n{bad}\n')
    from mta.server import webhooks
    two = parse_config(base + '[[webhook]]\nname = "a"\nurl = "http://h.example/"\n'
                              '[[webhook]]\nname = "a"\nurl = "http://h.example/"\n')
    with pytest.raises(ConfigError, match="two"):
        webhooks(two)


def test_check_config_reads_the_authorization_file(tmp_path):
    from mta.preflight import check
    auth = tmp_path / "auth"
    auth.write_text("Bearer x\n")
    auth.chmod(0o644)
    cfg = parse_config(f'[[listener]]\nport = 1\n[spool]\ndirectory = "{tmp_path}"\n'
                       f'[[webhook]]\nname = "ops"\nurl = "http://127.0.0.1:1/"\n'
                       f'authorization_file = "{auth}"\n')
    assert any("webhook 'ops'" in e and "chmod 600" in e for e in check(cfg).errors)
    assert not (tmp_path / "webhooks").exists()       # check-config writes nothing


def test_copytruncate_and_a_garbled_cursor(tmp_path, receiver, caplog):
    """logrotate's copytruncate empties the file under the cursor: read from 0 again; a
    cursor file that is not one is logged and the hook starts at the beginning."""
    r = receiver()

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        hook = _hook(tmp_path, r.url)
        hook.start(asyncio.get_running_loop())
        _log(w, 0, 60)
        w.flush()
        await _until(lambda: hook.sent_records >= 60)
        os.truncate(tmp_path / "log" / "mta.jsonl", 0)   # O_APPEND: the writer goes on at 0
        await asyncio.sleep(0.3)
        _log(w, 60, 30)
        w.flush()
        await _until(lambda: hook.sent_records >= 90)
        await hook.stop()
        (tmp_path / "state" / "h.cursor").write_bytes(b'{"dev": "x"')
        hook = _hook(tmp_path, r.url)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: hook.sent_records >= 30)
        await hook.stop()
        w.close()

    asyncio.run(main())
    assert [rec["n"] for rec in r.records(dedupe=False)] == list(range(90)) + list(range(60, 90))
    assert [rec["n"] for rec in r.records()] == list(range(90))   # the last 30 sent again
    assert "truncated" in caplog.text and "cannot read its cursor" in caplog.text


def test_a_crash_after_an_acknowledgement_repeats_that_batch_under_its_id(tmp_path, receiver):
    """Acknowledgements are written lazily (with the next batch): a crash before that
    repeats the acknowledged batch, with the id the receiver already has."""
    r = receiver()

    async def main() -> None:
        w = LogWriter(str(tmp_path / "log"), flush_interval=0.005)
        _log(w, 0, 40)
        w.flush()
        hook = _hook(tmp_path, r.url, batch_size=40)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: hook.sent_records >= 40)
        hook._task.cancel()                           # a crash: no stop(), no cursor write
        await asyncio.gather(hook._task, return_exceptions=True)
        await hook.poster.close()
        hook.cursor.close()
        _log(w, 40, 10)
        w.flush()
        hook = _hook(tmp_path, r.url, batch_size=40)
        hook.start(asyncio.get_running_loop())
        await _until(lambda: hook.sent_records >= 50)
        await hook.stop()
        w.close()

    asyncio.run(main())
    ids = [bid for bid, _, _ in r.batches]
    assert ids[0] == ids[1] and len(set(ids)) == 2    # the first batch twice, same id
    assert [rec["n"] for rec in r.records()] == list(range(50))
