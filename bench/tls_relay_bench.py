#!/usr/bin/env python3
"""Relay throughput with STARTTLS on both sides: mta versus Postfix, same harness, same run.

peerbench's loader and sink (Postfix's smtp-source / smtp-sink) speak no TLS, so this
bench brings its own, both Python asyncio in their own processes: a loader that opens
C concurrent sessions (STARTTLS on every connection, one message per connection unless
--persistent, like smtp-source) to the MTA on 127.0.0.1:2625, and a counting sink on
127.0.0.1:2626 that offers STARTTLS. The MTA under test relays everything to the sink:
mta with `[[listener]] tls_cert` (inbound STARTTLS) and `--smarthost` (outbound
opportunistic TLS: the sink offers STARTTLS); Postfix is a copy of peerbench's private
instance (its own config and queue under the state directory, ports 2625/2626) with
smtpd_tls_security_level = may, smtp_tls_security_level = may and
smtp_tls_connection_reuse = yes (else it opens a TLS connection per message). Certificates: a
self-signed CA and a server certificate for 127.0.0.1 / localhost made for the run.
Ports differ from relay_bench's (2525/2526/8026) so both can exist on one box.

Targets alternate (A, B, A, B); each run starts the MTA from an empty queue. Numbers:
accept/s (loader time) and deliver/s (loader start until the sink counted N), medians
and the ratio. Run as root (Postfix).

    python3 bench/tls_relay_bench.py                    # 50 KB, n=5000, c=50, 3 rounds
    python3 bench/tls_relay_bench.py -n 2000 -r 1 --persistent
    python3 bench/tls_relay_bench.py --against /tmp/base   # A/B: this tree vs another checkout
                                                           # (its extensions built in place)

For mta runs the daemon's CPU seconds per relayed message (utime+stime of its process from
/proc, loader start until the sink counted N) is printed too (cpu_us_per_msg): a measure
that holds on a loaded box where msg/s does not; the loader's and the sink's own CPU time
(loader_cpu_s, sink_cpu_s) show whether the harness is the bottleneck.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("MTA_BENCH_STATE", "/var/tmp/mta-bench")) / "tls"
PEER_POSTFIX = Path(os.environ.get("PEERBENCH_STATE", "/var/tmp/peerbench")) / "postfix"
PORT, SINK, ADMIN = 2625, 2626, 8126


# -- certificates ------------------------------------------------------------------------

def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.crt, server.key) for 127.0.0.1 / localhost."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o644)     # Postfix's smtpd reads it after dropping privileges
    return paths


# -- the sink (its own process) ------------------------------------------------------------

async def sink_main(port: int, count: int, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    done = asyncio.Event()
    stats = {"messages": 0, "first": 0.0, "last": 0.0, "tls_sessions": 0, "plain_messages": 0}
    open_writers: set[asyncio.StreamWriter] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        open_writers.add(writer)
        try:
            writer.write(b"220 sink.test ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 + (b"" if tls else b"250-STARTTLS\r\n") + b"250 SIZE 104857600\r\n")
                elif verb == b"STAR":
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(ctx)
                    tls = True
                    stats["tls_sessions"] += 1
                    continue
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    # the whole content in one call (a line per call cost the sink ~0.7 ms
                    # of CPU per 50 KB message, on the same 2 cores as the MTA under test)
                    data = await reader.readline()
                    if not data:
                        return
                    if data != b".\r\n":
                        await reader.readuntil(b"\r\n.\r\n")
                    now = time.time()
                    stats["first"] = stats["first"] or now
                    stats["last"] = now
                    stats["messages"] += 1
                    if not tls:
                        stats["plain_messages"] += 1
                    writer.write(b"250 2.0.0 ok\r\n")
                    if stats["messages"] >= count:
                        done.set()
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.1 no\r\n")
                if reader._buffer:  # type: ignore[attr-defined]  # pipelined
                    continue
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            return
        finally:
            open_writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", port, reuse_address=True, backlog=4096,
                                        limit=64 << 20)
    print(json.dumps({"ready": port}), flush=True)
    try:
        await asyncio.wait_for(done.wait(), timeout=float(os.environ.get("SINK_TIMEOUT", "900")))
    except TimeoutError:
        pass
    stats["cpu_s"] = time.process_time()
    await asyncio.sleep(1.0)      # duplicates
    server.close()
    # end the sessions the MTA keeps open: left to asyncio.run's cancellation, each printed a
    # CancelledError traceback (Python 3.11's StreamReaderProtocol callback)
    for w in list(open_writers):
        w.close()
    await asyncio.sleep(0.2)
    print(json.dumps(stats), flush=True)


# -- the loader (its own process) ----------------------------------------------------------

async def loader_main(port: int, n: int, size: int, conc: int, persistent: bool) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    line = b"x" * 78 + b"\r\n"
    body = line * (size // 80) + b"\r\n"
    todo = [n]
    errors: list[str] = []

    async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
        while True:
            reply = await reader.readline()
            if not reply.startswith(code):
                raise RuntimeError(f"wanted {code!r}, got {reply[:100]!r}")
            if reply[3:4] != b"-":
                return

    async def one_session() -> None:
        while todo[0] > 0:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                await expect(reader, b"220")
                writer.write(b"EHLO loader.test\r\n")
                await expect(reader, b"250")
                writer.write(b"STARTTLS\r\n")
                await expect(reader, b"220")
                await writer.start_tls(ctx)
                writer.write(b"EHLO loader.test\r\n")
                await expect(reader, b"250")
                while todo[0] > 0:
                    todo[0] -= 1
                    i = todo[0]
                    writer.write(b"MAIL FROM:<sender@peerbench.localdomain>\r\n"
                                 b"RCPT TO:<rcpt%d@example.com>\r\nDATA\r\n" % i)
                    await expect(reader, b"250")
                    await expect(reader, b"250")
                    await expect(reader, b"354")
                    writer.write(b"From: <sender@peerbench.localdomain>\r\nTo: <rcpt@example.com>\r\n"
                                 b"Subject: tls bench\r\nMessage-Id: <%d@loader.test>\r\n\r\n" % i
                                 + body + b".\r\n")
                    await expect(reader, b"250")
                    if not persistent:
                        break
                writer.write(b"QUIT\r\n")
                await writer.drain()
            except Exception as exc:    # noqa: BLE001 - reported, the bench fails
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            finally:
                writer.close()

    t0 = time.time()
    await asyncio.gather(*(one_session() for _ in range(conc)))
    print(json.dumps({"start": t0, "end": time.time(), "errors": errors[:5],
                      "cpu_s": time.process_time()}), flush=True)


# -- targets --------------------------------------------------------------------------------

def postfix_conf(cert: Path, key: Path, ca: Path) -> Path:
    """A copy of peerbench's private Postfix on our ports, with TLS both ways."""
    base = STATE / "postfix"
    if not (PEER_POSTFIX / "etc" / "main.cf").exists():
        sys.exit(f"no peerbench Postfix at {PEER_POSTFIX}: run ../shared/tools/peerbench/setup.sh")
    (base / "etc").mkdir(parents=True, exist_ok=True)
    (base / "data").mkdir(exist_ok=True)
    shutil.chown(base / "data", "postfix")      # master.lock, TLS session caches
    (base / "spool").mkdir(exist_ok=True)
    shutil.copy(PEER_POSTFIX / "etc" / "master.cf", base / "etc" / "master.cf")
    master = (base / "etc" / "master.cf").read_text().replace("127.0.0.1:2525 ", f"127.0.0.1:{PORT} ")
    if "tlsmgr" not in master:      # TLS needs its PRNG/session-cache manager
        master += "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"
    if "tlsproxy" not in master:    # smtp_tls_connection_reuse goes through tlsproxy
        master += "tlsproxy  unix  -       -       n       -       0       tlsproxy\n"
    (base / "etc" / "master.cf").write_text(master)
    main = (PEER_POSTFIX / "etc" / "main.cf").read_text().replace(str(PEER_POSTFIX), str(base))
    main = main.replace("[127.0.0.1]:2526", f"[127.0.0.1]:{SINK}")
    main = main.replace("smtpd_tls_security_level = none", "smtpd_tls_security_level = may")
    main = main.replace("smtp_tls_security_level = none", "smtp_tls_security_level = may")
    main += (f"\nsmtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
             f"smtp_tls_CAfile = {ca}\nsmtpd_tls_loglevel = 0\nsmtp_tls_loglevel = 0\n"
             # without it Postfix opens a new TLS connection per message (no caching)
             "smtp_tls_connection_reuse = yes\n"
             f"smtp_tls_session_cache_database = btree:{base}/data/smtp_scache\n"
             f"smtpd_tls_session_cache_database = btree:{base}/data/smtpd_scache\n")
    (base / "etc" / "main.cf").write_text(main)
    return base / "etc"


def start_postfix(conf: Path) -> subprocess.Popen | None:
    queue = subprocess.run(["postconf", "-c", str(conf), "-h", "queue_directory"],
                           capture_output=True, text=True, check=True).stdout.strip()
    for d in ("maildrop", "incoming", "active", "deferred", "defer", "bounce", "trace", "flush",
              "hold", "saved", "corrupt"):
        shutil.rmtree(Path(queue) / d, ignore_errors=True)
    subprocess.run(["postfix", "-c", str(conf), "start"], capture_output=True, check=True)
    return None


def stop_postfix(conf: Path) -> None:
    queue = subprocess.run(["postconf", "-c", str(conf), "-h", "queue_directory"],
                           capture_output=True, text=True).stdout.strip()
    pidf = Path(queue) / "pid" / "master.pid"
    pid = pidf.read_text().strip() if pidf.exists() else ""
    subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True)
    for _ in range(100):
        if not pid or subprocess.run(["pgrep", "-g", pid], capture_output=True).returncode:
            break
        time.sleep(0.1)


def mta_config(cert: Path, key: Path, workers: int = 1) -> Path:
    work = STATE / "mta"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "mta.toml"
    conf.write_text(
        f'[server]\nhostname = "mta.bench"\nworkers = {workers}\n[spool]\ndirectory = "{work}/spool"\n'
        f'[log]\ndirectory = "{work}/log"\n[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[admin]\nlisten = "127.0.0.1:{ADMIN}"\n'
        f'[delivery]\nsmarthost = "127.0.0.1:{SINK}"\n'
        f'[[listener]]\naddress = "127.0.0.1"\nport = {PORT}\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    return conf


def start_mta(conf: Path, root: Path = ROOT) -> subprocess.Popen:
    work = conf.parent
    shutil.rmtree(work / "spool", ignore_errors=True)
    shutil.rmtree(work / "log", ignore_errors=True)
    return subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c", str(conf)], cwd=work,
                            env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.DEVNULL,
                            stderr=open(work / "daemon.err", "ab"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), of its children it has waited for and
    of its live descendants (the workers under a supervisor)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    except OSError:
        return 0.0
    return (sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
            + sum(cpu_seconds(k) for k in kids))


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"nothing greets on {port}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # TIME_WAIT of a last run
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run_once(target: str, n: int, size: int, conc: int, persistent: bool, certs,
             root: Path = ROOT, workers: int = 1) -> dict:
    """One run; `target` is "postfix" or an mta label (the tree at `root`)."""
    ca, cert, key = certs
    for p in (PORT, SINK):
        if not port_free(p):
            sys.exit(f"port {p} busy")
    me = [sys.executable, __file__]
    sink = subprocess.Popen(me + ["--role", "sink", "-n", str(n), "--cert", str(cert),
                                  "--key", str(key)], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    sink.stdout.readline()
    proc = None
    pconf = None
    if target == "postfix":
        pconf = postfix_conf(cert, key, ca)
        start_postfix(pconf)
    else:
        proc = start_mta(mta_config(cert, key, workers), root)
    cpu0 = cpu1 = 0.0
    try:
        wait_port(PORT)
        time.sleep(1.0)
        if proc is not None:
            if os.environ.get("TLS_BENCH_HOOK"):    # e.g. a profiler: run with {pid}
                subprocess.Popen(os.environ["TLS_BENCH_HOOK"].format(pid=proc.pid), shell=True)
            cpu0 = cpu_seconds(proc.pid)
        loader = subprocess.run(me + ["--role", "loader", "-n", str(n), "-s", str(size),
                                      "-c", str(conc)] + (["--persistent"] if persistent else []),
                                capture_output=True, text=True)
        ld = json.loads(loader.stdout.strip().splitlines()[-1])
        out, _ = sink.communicate(timeout=900)
        st = json.loads(out.strip().splitlines()[-1])
        if proc is not None:
            cpu1 = cpu_seconds(proc.pid)
    finally:
        if pconf is not None:
            stop_postfix(pconf)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if sink.poll() is None:
            sink.kill()
    ok = st["messages"] == n and not ld["errors"]
    res = {"ok": ok, "accept_per_s": n / (ld["end"] - ld["start"]),
           "deliver_per_s": st["messages"] / max(1e-9, st["last"] - ld["start"]),
           "delivered": st["messages"], "sink_tls_sessions": st["tls_sessions"],
           "plain_messages": st["plain_messages"], "errors": ld["errors"],
           "loader_cpu_s": ld.get("cpu_s", 0.0), "sink_cpu_s": st.get("cpu_s", 0.0)}
    if proc is not None:
        # the daemon's CPU while it relayed (its sink-side tail included, the idle 1 s not)
        res["cpu_us_per_msg"] = (cpu1 - cpu0) / max(1, st["messages"]) * 1e6
    print(f"RUN {target} " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in res.items()), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["bench", "sink", "loader"], default="bench")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("-s", "--size", type=int, default=51200)
    ap.add_argument("-c", "--concurrency", type=int, default=50)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--persistent", action="store_true", help="all messages of a loader "
                    "session over one connection (smtp-source -d)")
    ap.add_argument("--only", choices=["mta", "postfix"])
    ap.add_argument("--workers", type=int, default=1, help="mta's [server] workers (default 1: "
                    "one process, as relay_bench runs it)")
    ap.add_argument("--against", type=Path, metavar="TREE",
                    help="A/B: mta from another checkout (label base) vs this tree (label mta)")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    try:        # the loader and the sink share the 2 cores with the target: uvloop is cheaper
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.role == "sink":
        run(sink_main(SINK, args.n, args.cert, args.key))
        return 0
    if args.role == "loader":
        run(loader_main(PORT, args.n, args.size, args.concurrency, args.persistent))
        return 0
    certs = make_certs(STATE / "certs")
    if args.against:
        targets = ["base", "mta"]
    else:
        targets = [args.only] if args.only else ["postfix", "mta"]
    this = Path(os.environ.get("TLS_BENCH_THIS", ROOT))     # default: this checkout
    roots = {"base": args.against.resolve() if args.against else ROOT, "mta": this, "postfix": ROOT}
    results: dict[str, list[dict]] = {t: [] for t in targets}
    for _ in range(args.rounds):
        for t in targets:
            results[t].append(run_once(t, args.n, args.size, args.concurrency, args.persistent,
                                       certs, roots[t], args.workers))
    med = {t: statistics.median(r["deliver_per_s"] for r in rs if r["ok"]) if any(
        r["ok"] for r in rs) else 0.0 for t, rs in results.items()}
    acc = {t: statistics.median(r["accept_per_s"] for r in rs) for t, rs in results.items()}
    line = (f"RESULT tls_relay size={args.size} n={args.n} c={args.concurrency} "
            f"persistent={int(args.persistent)} rounds={args.rounds} workers={args.workers} "
            + " ".join(f"{t}_deliver_per_s={med[t]:.0f} {t}_accept_per_s={acc[t]:.0f}" for t in targets))
    for t, rs in results.items():
        cpu = [r["cpu_us_per_msg"] for r in rs if r["ok"] and "cpu_us_per_msg" in r]
        if cpu:
            line += f" {t}_cpu_us_per_msg={statistics.median(cpu):.0f}"
    other = "base" if args.against else "postfix"
    if len(targets) == 2 and med[other]:
        line += f" ratio={med['mta'] / med[other]:.2f}"
    if args.against:
        cb = [r["cpu_us_per_msg"] for r in results["base"] if r["ok"]]
        cm = [r["cpu_us_per_msg"] for r in results["mta"] if r["ok"]]
        if cb and cm:
            line += f" cpu_ratio={statistics.median(cm) / statistics.median(cb):.3f} base={args.against}"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
