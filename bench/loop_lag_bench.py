#!/usr/bin/env python3
"""Event-loop lag and relay rate while returned mail floods the bounce domain (issue 15).

A real `mta serve` relays mail (loader -> mta -> sink, all on loopback 127.0.126.x)
while a second client floods the bounce domain with returned mail: RFC 3464 DSNs of
the sisimai corpus (tests/data, each sent to a VERP return path minted for the
recipient it names), generated hard bounces with a fresh recipient each, and ARF
complaints from a trusted feedback-loop address. Every proven hard bounce and
complaint adds a suppression entry: SQLite writes in the daemon.

The loop lag is measured inside the daemon: the bench starts it through a small
wrapper that runs a probe task on the daemon's own event loop (uvloop): a 10 ms
sleep, over and over, recording how late each wake-up comes. Nothing in the tree
under test has to know about the probe, so the same wrapper measures another
checkout. Reported per phase: max and p99 of the lag, the relay rate (messages the
sink received per second, from the loader's first connection to the sink's last
message), returned messages accepted (and deferred with 451), suppression entries
in the store afterwards.

Phases, each from a fresh spool: `relay` (relay alone) and `flood` (relay plus the
bounce flood). With --against DIR the checkout in DIR (its extensions built or
copied in place) runs too, alternating with this tree, so before and after come
from the same run on the same noisy machine.

    python3 bench/loop_lag_bench.py                         # this tree, 3 rounds
    python3 bench/loop_lag_bench.py --against /tmp/before -r 3 -n 3000

Measured 2026-12-02 on the shared 2-core VM (load ~9 from other work), -r 3 -n 2000 -c 10,
10 KB, medians (worst max), the suppression writer thread (this) against the tree before it
(base): relay alone 1294/s lag p99 10 ms vs 1327/s 11 ms (the same code); flood 721/s
p99 18 ms max 25 ms (59) vs 514/s 26 ms 32 ms (66); flood plus an import of 300,000
entries 225/s p99 71 ms max 91 ms (96) vs 72/s 77 ms max 5,392 ms (13,883): before, the
loop waited on the importer's write lock (busy_timeout) and then refreshed its filter
entry by entry. Under the flood alone the commits (~1-7 ms each here) were a small part
of the lag; CPU shared with the loader, sink, parsers and other work is most of it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("MTA_BENCH_STATE", "/var/tmp/mta-bench")) / "looplag"
HOST, SINK_HOST, FLOOD_HOST = "127.0.126.1", "127.0.126.2", "127.0.126.3"
PORT, SINK, ADMIN = 2725, 2726, 2727
BOUNCE_DOMAIN = "bounces.bench"
PROBE_INTERVAL = 0.010


# -- the probe, run inside the daemon process ------------------------------------------------

def probe_main(out: str, tree: str, argv: list[str]) -> None:
    """Run `mta <argv>` from `tree` with a lag probe on its event loop."""
    sys.path.insert(0, tree)
    import uvloop
    run = uvloop.run

    async def probe() -> None:
        buf: list[str] = []
        last_flush = time.perf_counter()
        clock = time.perf_counter     # (uvloop's loop.time() counts whole milliseconds)
        with open(out, "a") as f:
            while True:
                t = clock()
                await asyncio.sleep(PROBE_INTERVAL)
                now = clock()
                buf.append(f"{time.time():.4f} {now - t - PROBE_INTERVAL:.6f}\n")
                if now - last_flush >= 0.5:
                    f.write("".join(buf))
                    f.flush()
                    buf.clear()
                    last_flush = now

    async def with_probe(coro):
        task = asyncio.get_running_loop().create_task(probe())
        try:
            return await coro
        finally:
            task.cancel()

    uvloop.run = lambda coro, **kw: run(with_probe(coro), **kw)
    from mta.cli import main
    if os.environ.get("LOOPLAG_PROFILE"):     # diagnostics: cProfile of the loop thread
        import cProfile
        cProfile.runctx("main(argv)", globals(), {"main": main, "argv": argv},
                        os.environ["LOOPLAG_PROFILE"])
        raise SystemExit(0)
    raise SystemExit(main(argv))


def lag_stats(path: Path, start: float, end: float) -> dict:
    lags = []
    for line in path.read_text().splitlines():
        try:
            t, lag = line.split()
        except ValueError:
            continue
        if start <= float(t) <= end:
            lags.append(max(0.0, float(lag)))
    if not lags:
        return {"samples": 0, "max_ms": 0.0, "p99_ms": 0.0}
    lags.sort()
    return {"samples": len(lags), "max_ms": lags[-1] * 1e3,
            "p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1e3,
            "mean_ms": statistics.fmean(lags) * 1e3}


# -- the sink ------------------------------------------------------------------------------

async def sink_main(count: int) -> None:
    done = asyncio.Event()
    stats = {"messages": 0, "first": 0.0, "last": 0.0}

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 sink.bench ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 104857600\r\n")
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    while True:
                        data = await reader.readline()
                        if not data or data == b".\r\n":
                            break
                    if not data:
                        return
                    now = time.time()
                    stats["first"] = stats["first"] or now
                    stats["last"] = now
                    stats["messages"] += 1
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
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    server = await asyncio.start_server(session, SINK_HOST, SINK, reuse_address=True, backlog=1024)
    print(json.dumps({"ready": SINK}), flush=True)
    try:
        await asyncio.wait_for(done.wait(), timeout=float(os.environ.get("SINK_TIMEOUT", "120")))
    except TimeoutError:
        pass
    server.close()
    print(json.dumps(stats), flush=True)


# -- the loader: relay and (optionally) the bounce flood ------------------------------------

async def _expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    while True:
        reply = await reader.readline()
        if not reply:
            raise ConnectionError("closed")
        if reply[3:4] != b"-":
            if not reply.startswith(code):
                return reply
            return b""


async def loader_main(n: int, size: int, conc: int, flood_file: str | None, flood_conc: int) -> None:
    line = b"x" * 78 + b"\r\n"
    body = line * (size // 80) + b"\r\n"
    todo = [n]
    relay_done = asyncio.Event()
    errors: list[str] = []
    counts = {"bounces": 0, "deferred": 0, "refused": 0}

    async def relay_session() -> None:
        while todo[0] > 0:
            reader, writer = await asyncio.open_connection(HOST, PORT, local_addr=(HOST, 0))
            try:
                await _expect(reader, b"220")
                writer.write(b"EHLO loader.bench\r\n")
                await _expect(reader, b"250")
                while todo[0] > 0:
                    todo[0] -= 1
                    i = todo[0]
                    writer.write(b"MAIL FROM:<sender@loader.bench>\r\n"
                                 b"RCPT TO:<rcpt%d@example.com>\r\nDATA\r\n" % i)
                    for code in (b"250", b"250", b"354"):
                        bad = await _expect(reader, code)
                        if bad:
                            raise RuntimeError(f"relay: {bad[:100]!r}")
                    writer.write(b"From: <sender@loader.bench>\r\nTo: <rcpt@example.com>\r\n"
                                 b"Subject: loop lag bench\r\nMessage-Id: <%d@loader.bench>\r\n\r\n" % i
                                 + body + b".\r\n")
                    bad = await _expect(reader, b"250")
                    if bad:
                        raise RuntimeError(f"relay data: {bad[:100]!r}")
                writer.write(b"QUIT\r\n")
                await writer.drain()
            except Exception as exc:    # noqa: BLE001 - reported, the bench fails
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            finally:
                writer.close()

    async def flood_session(items: list[tuple[str, bytes]], offset: int) -> None:
        k = offset
        while not relay_done.is_set():
            try:
                reader, writer = await asyncio.open_connection(HOST, PORT,
                                                               local_addr=(FLOOD_HOST, 0))
            except OSError as exc:
                errors.append(f"flood connect: {exc}")
                return
            try:
                await _expect(reader, b"220")
                writer.write(b"EHLO flood.bench\r\n")
                await _expect(reader, b"250")
                for _ in range(20):
                    if relay_done.is_set():
                        break
                    rcpt, msg = items[k % len(items)]
                    k += 1
                    writer.write(b"MAIL FROM:<>\r\nRCPT TO:<%s>\r\n" % rcpt.encode())
                    if await _expect(reader, b"250"):
                        raise RuntimeError("flood MAIL refused")
                    bad = await _expect(reader, b"250")
                    if bad:
                        writer.write(b"RSET\r\n")
                        await _expect(reader, b"250")
                        counts["deferred" if bad.startswith(b"4") else "refused"] += 1
                        await asyncio.sleep(0.05)
                        continue
                    writer.write(b"DATA\r\n")
                    if await _expect(reader, b"354"):
                        raise RuntimeError("flood DATA refused")
                    writer.write(msg + b".\r\n")
                    bad = await _expect(reader, b"250")
                    if bad:
                        counts["deferred" if bad.startswith(b"4") else "refused"] += 1
                    else:
                        counts["bounces"] += 1
                writer.write(b"QUIT\r\n")
                await writer.drain()
            except Exception as exc:    # noqa: BLE001
                errors.append(f"flood {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
            finally:
                writer.close()

    floods = []
    if flood_file:
        with open(flood_file, "rb") as f:
            items = pickle.load(f)
        floods = [asyncio.ensure_future(flood_session(items, i * 997)) for i in range(flood_conc)]
        await asyncio.sleep(1.0)        # the flood is running before the relay starts
    t0 = time.time()
    await asyncio.gather(*(relay_session() for _ in range(conc)))
    t1 = time.time()
    relay_done.set()
    await asyncio.gather(*floods)
    print(json.dumps({"start": t0, "end": t1, "errors": errors[:5], **counts}), flush=True)


# -- returned mail ---------------------------------------------------------------------------

def _dot_stuff(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return b"\r\n".join((b"." + ln if ln.startswith(b".") else ln) for ln in data.split(b"\r\n")[:-1]) + b"\r\n"


def _dsn(rcpt: str) -> bytes:
    return (f"From: MAILER-DAEMON@mx.remote.bench\r\nTo: b@{BOUNCE_DOMAIN}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"BB\"\r\n\r\n"
            "--BB\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n"
            "--BB\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.bench\r\n\r\n"
            f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: user unknown\r\n\r\n"
            "--BB\r\nContent-Type: message/rfc822\r\n\r\n"
            f"From: news@sender.bench\r\nTo: {rcpt}\r\nSubject: news\r\n\r\nhello\r\n--BB--\r\n").encode()


def _arf(rcpt: str) -> bytes:
    return (f"From: fbl@isp.bench\r\nTo: fbl@{BOUNCE_DOMAIN}\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=feedback-report; boundary=\"FF\"\r\n\r\n"
            "--FF\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n"
            "--FF\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            f"User-Agent: isp-fbl/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <{rcpt}>\r\n"
            f"Source-IP: {HOST}\r\n\r\n"
            "--FF\r\nContent-Type: message/rfc822\r\n\r\n"
            f"From: news@sender.bench\r\nTo: {rcpt}\r\nSubject: offer\r\n\r\nbuy now\r\n--FF--\r\n").encode()


def flood_items(key: bytes, tag: str, generated: int) -> list[tuple[str, bytes]]:
    """(RCPT TO, dot-stuffed message) pairs: the corpus DSNs, each to a VERP address
    minted for the recipient it names, then generated hard bounces and complaints."""
    sys.path.insert(0, str(ROOT))
    from mta.feedback import verp
    from mta.feedback.bounce import parse_message
    items = []
    exp = time.time() + 30 * 86400
    corpus = ROOT / "tests" / "data" / "sisimai-set-of-emails" / "maildir" / "bsd"
    for path in sorted(corpus.glob("*.eml")):
        data = path.read_bytes()
        if len(data) > 200_000:
            continue
        try:
            rep = parse_message(data)
        except Exception:      # noqa: BLE001 - the daemon gets it anyway
            rep = None
        rcpts = [r.recipient for r in (rep.recipients if rep else []) if r.recipient]
        if rep is not None and rep.feedback is not None and rep.feedback.original_rcpt_to:
            rcpts.insert(0, rep.feedback.original_rcpt_to)
        if rcpts and "@" in rcpts[0]:
            to = verp.encode(os.urandom(16), 0, rcpts[0], exp, key, "b", BOUNCE_DOMAIN)
        else:
            to = f"postmaster@{BOUNCE_DOMAIN}"
        items.append((to, _dot_stuff(data)))
    for i in range(generated):
        rcpt = f"u{tag}.{i}@flood{i % 50}.example"
        if i % 4 == 3:
            items.append((f"fbl@{BOUNCE_DOMAIN}", _dot_stuff(_arf(rcpt))))
        else:
            to = verp.encode(os.urandom(16), 0, rcpt, exp, key, "b", BOUNCE_DOMAIN)
            items.append((to, _dot_stuff(_dsn(rcpt))))
    random.Random(7).shuffle(items)
    return items


# -- one run --------------------------------------------------------------------------------

def _wait_greeting(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"daemon exited ({proc.returncode}); see {STATE}/*/daemon.err")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"nothing greets on {host}:{port}")


def _sub(role: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", role, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def run_once(label: str, tree: Path, phase: str, args, key: bytes, rnd: int) -> dict:
    work = STATE / label
    shutil.rmtree(work, ignore_errors=True)
    (work / "var" / "suppression").mkdir(parents=True)
    keyfile = work / "var" / "suppression" / "suppression.key"
    keyfile.write_bytes(key)
    os.chmod(keyfile, 0o600)
    conf = work / "mta.toml"
    conf.write_text(
        f'[server]\nhostname = "mta.bench"\n[spool]\ndirectory = "{work}/spool"\n'
        f'[log]\ndirectory = "{work}/log"\n[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[admin]\nlisten = "{HOST}:{ADMIN}"\n'
        f'[delivery]\nsmarthost = "{SINK_HOST}:{SINK}"\n'
        f'[bounces]\ndomain = "{BOUNCE_DOMAIN}"\nparse_workers = {args.parse_workers}\n'
        f'trusted_fbl_sources = ["{FLOOD_HOST}/32"]\n'
        "[adaptive]\nenabled = false\n"   # the flood's complaints must not suspend the sink
        f'[suppression]\nstore = "{work}/var/suppression/suppression.sqlite"\n'
        f'key_file = "{keyfile}"\n'
        f'[[listener]]\naddress = "{HOST}"\nport = {PORT}\n'
        f'relay_cidrs = ["{HOST}/32"]\n')
    flood = None
    if phase in ("flood", "import"):
        flood = work / "flood.pickle"
        with open(flood, "wb") as f:
            pickle.dump(flood_items(key, f"{label}{rnd}", args.generated), f)
    probe = work / "lag.txt"
    probe.touch()
    sink = _sub("sink", "-n", str(args.n))
    assert sink.stdout is not None
    sink.stdout.readline()
    daemon = subprocess.Popen([sys.executable, __file__, "--role", "daemon", "--probe-out", str(probe),
                               "--tree", str(tree), "serve", "-c", str(conf)],
                              cwd=work, env=dict(os.environ, PYTHONPATH=str(tree)),
                              stdout=subprocess.DEVNULL, stderr=open(work / "daemon.err", "ab"))
    try:
        _wait_greeting(HOST, PORT, daemon)
        time.sleep(1.0)
        load = _sub("load", "-n", str(args.n), "-s", str(args.size), "-c", str(args.conc),
                    *(["--flood-file", str(flood), "--flood-conc", str(args.flood_conc)] if flood else []))
        importer = None
        if phase == "import":
            # an operator imports a list meanwhile: `mta suppress import` holds the store's
            # write lock for its one transaction
            lst = work / "import.txt"
            lst.write_text("".join(f"imp{i}@list{i % 97}.example\n" for i in range(args.import_n)))
            time.sleep(1.5)
            importer = subprocess.Popen(
                [sys.executable, "-m", "mta", "suppress", "-c", str(conf), "import", str(lst)],
                cwd=work, env=dict(os.environ, PYTHONPATH=str(tree)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = load.communicate(timeout=600)
        if importer is not None:
            importer.wait(600)
        loaded = json.loads(out.strip().splitlines()[-1])
        if loaded["errors"] and not any(e.startswith("flood") for e in loaded["errors"]):
            sink.send_signal(signal.SIGTERM)
        sout, _ = sink.communicate(timeout=600)
        got = json.loads(sout.strip().splitlines()[-1])
        time.sleep(0.6)               # the probe's last half second reaches its file
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    end = got["last"] or time.time()
    res = {"tree": label, "phase": phase, "delivered": got["messages"],
           "relay_per_s": got["messages"] / max(1e-6, end - loaded["start"]),
           **lag_stats(probe, loaded["start"], end),
           "bounces": loaded["bounces"], "deferred": loaded["deferred"], "errors": loaded["errors"]}
    try:
        db = sqlite3.connect(f"file:{work}/var/suppression/suppression.sqlite?mode=ro", uri=True)
        res["suppressed"] = db.execute("SELECT count(*) FROM suppression").fetchone()[0]
        db.close()
    except sqlite3.Error:
        res["suppressed"] = None
    res["expected_min"] = _expected(work) if phase != "relay" else 0
    return res


def _expected(work: Path) -> int:
    """Suppressions the daemon logged as made (OOB/Feedback records with "suppressed")."""
    n = 0
    try:
        with open(work / "log" / "mta.jsonl", "rb") as f:
            for line in f:
                if b'"suppressed":"' in line or b'"suppressed": "' in line:
                    n += 1
    except OSError:
        pass
    return n


def main() -> int:
    if sys.argv[1:3] == ["--role", "daemon"]:    # --probe-out F --tree T, then mta's own arguments
        probe_main(sys.argv[4], sys.argv[6], sys.argv[7:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["bench", "daemon", "sink", "load"], default="bench")
    ap.add_argument("-n", type=int, default=3000, help="messages relayed per run")
    ap.add_argument("-s", "--size", type=int, default=10240)
    ap.add_argument("-c", "--conc", type=int, default=20)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--flood-conc", type=int, default=8, help="sessions sending returned mail")
    ap.add_argument("--generated", type=int, default=4000, help="generated DSNs/ARFs per run")
    ap.add_argument("--parse-workers", type=int, default=2)
    ap.add_argument("--phases", default="relay,flood,import",
                    help="relay: alone; flood: with returned mail; import: also `mta suppress "
                         "import` of --import-n addresses meanwhile")
    ap.add_argument("--import-n", type=int, default=300_000)
    ap.add_argument("--against", type=Path, metavar="TREE", help="also run the checkout in TREE")
    ap.add_argument("--flood-file")
    args = ap.parse_args()
    if args.role == "sink":
        asyncio.run(sink_main(args.n))
        return 0
    if args.role == "load":
        asyncio.run(loader_main(args.n, args.size, args.conc, args.flood_file, args.flood_conc))
        return 0
    STATE.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    trees = [("this", ROOT)] + ([("base", args.against.resolve())] if args.against else [])
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for phase in args.phases.split(","):
            for label, tree in (trees if rnd % 2 == 0 else trees[::-1]):
                r = run_once(label, tree, phase, args, key, rnd)
                results.setdefault((label, phase), []).append(r)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                  for k, v in r.items()}), flush=True)
    for (label, phase), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("relay_per_s", "max_ms", "p99_ms", "bounces", "deferred")}
        worst = max(r["max_ms"] for r in rs)
        print(f"RESULT loop_lag tree={label} phase={phase} n={args.n} size={args.size} "
              f"rounds={len(rs)} relay_per_s={med['relay_per_s']:.0f} lag_p99_ms={med['p99_ms']:.1f} "
              f"lag_max_ms={med['max_ms']:.1f} (worst {worst:.1f}) bounces={med['bounces']:.0f} "
              f"deferred={med['deferred']:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
