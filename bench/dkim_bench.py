"""DKIM signing throughput: mta.dkim.Signer vs dkimpy vs OpenSSL's raw sign rate.

Signs 2 KB and 50 KB messages (relaxed/relaxed, the default header set) with
RSA-2048 and Ed25519, on 1 thread and on all cores, through the public API
(Signer.sign_batch: signed messages out, batches of --batch). dkimpy signs the
same messages in the same process; `openssl speed` gives the raw sign rate of
the same libcrypto in the same run. Prints numbers and ratios; not a test.

Goals: RSA-2048 per core >= 90% of the raw rate and >= 20x dkimpy; Ed25519
2 KB messages >= 20,000/s per core. For 50 KB the SHA-256 of the body alone
takes ~10% of an RSA-2048 signature's time, so the ratio is also printed
against "raw sign + body hash" and for headers_only=True (no message copy).

    python3 bench/dkim_bench.py [--seconds 2] [--batch 256] [--no-openssl]
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta.dkim.signer import Signer, SignSpec, keygen, load_key  # noqa: E402

HEADER = (b"From: Example Sender <sender@example.com>\r\n"
          b"To: Some Recipient <rcpt@example.org>\r\n"
          b"Subject: Your weekly report, with a subject long enough to be typical\r\n"
          b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
          b"Message-ID: <20240101120000.12345@example.com>\r\n"
          b"MIME-Version: 1.0\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: 8bit\r\n"
          b"List-Unsubscribe: <mailto:unsubscribe@example.com>\r\n\r\n")
LINE = b"Lorem ipsum dolor sit amet,  consectetur adipiscing elit, sed do eiusmod tempor.\r\n"


def message(size: int) -> bytes:
    return HEADER + LINE * max(1, (size - len(HEADER)) // len(LINE))


def rate(fn, per_call: int, seconds: float) -> float:
    """Calls per second of fn() times per_call, over at least `seconds`."""
    fn()                                       # warm up (contexts, caches)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n * per_call / elapsed


def sha256_rate() -> float:
    """Bytes per second of SHA-256 over 50 KB in this process (hashlib: the same libcrypto)."""
    import hashlib
    data = b"x" * 50 * 1024
    return rate(lambda: hashlib.sha256(data).digest(), len(data), 0.5)


def openssl_speed(seconds: int) -> dict[str, float]:
    """Raw single-core sign/s of rsa2048 and ed25519 from `openssl speed`."""
    if shutil.which("openssl") is None:
        return {}
    out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "rsa2048", "ed25519"],
                         capture_output=True, text=True, check=False).stdout
    got = {}
    m = re.search(r"^rsa 2048 bits\s+\S+s\s+\S+s\s+([\d.]+)", out, re.MULTILINE)
    if m:
        got["rsa"] = float(m.group(1))
    m = re.search(r"EdDSA \(Ed25519\)\s+\S+s\s+\S+s\s+([\d.]+)", out)
    if m:
        got["ed25519"] = float(m.group(1))
    return got


def dkimpy_rate(msg: bytes, alg: str, key_pem: bytes, seed_b64: bytes, seconds: float) -> float:
    try:
        import dkim
    except ImportError:
        return 0.0
    heads = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
             b"content-type", b"content-transfer-encoding", b"list-unsubscribe"]
    if alg == "rsa":
        def one():
            dkim.sign(msg, b"rsa", b"example.com", key_pem, include_headers=heads,
                      canonicalize=(b"relaxed", b"relaxed"))
    else:
        def one():
            dkim.sign(msg, b"ed", b"example.com", seed_b64, include_headers=heads,
                      canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=b"ed25519-sha256")
    return rate(one, 1, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--batch", type=int, default=256, help="messages per sign_batch call")
    ap.add_argument("--no-openssl", action="store_true", help="skip `openssl speed` (12 s)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="dkim-bench-"))
    keys, pems = {}, {}
    for alg in ("rsa", "ed25519"):
        pems[alg], _ = keygen(alg, 2048)
        (tmp / alg).write_bytes(pems[alg])
        keys[alg] = load_key(str(tmp / alg), "example.com", "rsa" if alg == "rsa" else "ed")
    from cryptography.hazmat.primitives import serialization   # dkimpy wants the raw seed
    raw_seed = serialization.load_pem_private_key(pems["ed25519"], None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    seed_b64 = base64.b64encode(raw_seed)

    print(f"cores: {cores}; batch: {args.batch}; {args.seconds:.1f} s per measurement")
    raw = {} if args.no_openssl else openssl_speed(3)
    if raw:
        print(f"openssl speed (1 core): rsa2048 {raw.get('rsa', 0):,.0f} sign/s, "
              f"ed25519 {raw.get('ed25519', 0):,.0f} sign/s")
    results: dict[tuple[str, str, int], float] = {}
    py: dict[tuple[str, str], float] = {}
    print(f"\n{'alg':8} {'size':>5} {'1 thread/s':>12} {f'{cores} threads/s':>13} "
          f"{'dkimpy/s':>10} {'x dkimpy':>9}")
    for alg in ("rsa", "ed25519"):
        spec = [SignSpec(keys[alg])]
        for label, size in (("2KB", 2048), ("50KB", 50 * 1024)):
            msgs = [message(size)] * args.batch
            specs = [spec] * args.batch
            for threads in (1, cores):
                with Signer(threads) as s:
                    results[alg, label, threads] = rate(
                        lambda s=s, m=msgs, sp=specs: s.sign_batch(m, sp), args.batch, args.seconds)
            if alg == "rsa" and label == "50KB":   # without the copy into the signed message
                with Signer(1) as s:
                    heads_only = rate(lambda s=s, m=msgs, sp=specs: s.sign_batch(
                        m, sp, headers_only=True), args.batch, args.seconds)
            py[alg, label] = dkimpy_rate(msgs[0], alg, pems[alg], seed_b64, args.seconds)
            one, all_ = results[alg, label, 1], results[alg, label, cores]
            ratio = f"{one / py[alg, label]:8.1f}x" if py[alg, label] else "     n/a"
            print(f"{alg:8} {label:>5} {one:12,.0f} {all_:13,.0f} {py[alg, label]:10,.0f} {ratio}")

    print("\nratios (goal in brackets):")
    for label in ("2KB", "50KB"):
        one = results["rsa", label, 1]
        if raw.get("rsa"):
            print(f"  RSA-2048 {label:>4} per core vs openssl raw sign: {one / raw['rsa']:6.1%} [>= 90%]")
        if py["rsa", label]:
            print(f"  RSA-2048 {label:>4} per core vs dkimpy:           {one / py['rsa', label]:6.1f}x [>= 20x]")
        print(f"  RSA-2048 {label:>4} {cores} threads vs 1 thread:     "
              f"{results['rsa', label, cores] / one:6.2f}x [ideal {cores}x]")
    if raw.get("rsa"):
        body_bound = 1 / (1 / raw["rsa"] + 50 * 1024 / sha256_rate())
        print(f"  RSA-2048 50KB per core, headers_only=True: {heads_only / raw['rsa']:6.1%} of raw "
              f"(raw sign + SHA-256 of the body alone: {body_bound / raw['rsa']:.1%})")
    ed = results["ed25519", "2KB", 1]
    print(f"  Ed25519   2KB per core: {ed:,.0f} msg/s [>= 20,000]"
          + (f"; vs openssl raw sign: {ed / raw['ed25519']:.1%}" if raw.get("ed25519") else ""))
    print(f"  Ed25519   2KB {cores} threads vs 1 thread: "
          f"{results['ed25519', '2KB', cores] / ed:.2f}x [ideal {cores}x]")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
