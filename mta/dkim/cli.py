"""`mta dkim sign | verify | keygen`: the operator's DKIM tools.

sign    reads a message on stdin, prints it signed (the same native signer the
        daemon uses).
verify  reads a message on stdin and prints one verdict line per signature,
        using dkimpy as an independent verifier; the key comes from DNS (the
        system resolver, or --dns IP:PORT) or from --key-record "v=DKIM1; ...".
keygen  writes a new private key (mode 0600, refusing to overwrite) and
        prints the DNS TXT record to publish.
--algorithm is spelled as in the config's [[dkim]] algorithm, rsa-sha256 or
ed25519-sha256, in sign and keygen alike; the key types rsa and ed25519 are
accepted as the same.
Diagnostics: exit 1 with one line naming the problem (verify: a signature that
fails, whatever the reason, is a "fail" line, never a traceback); 2 for usage errors.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from mta.dkim.signer import (DkimConfigError, DkimError, SignSpec, Signer, dns_record, keygen,
                             load_key)

_SIG = re.compile(rb"(?im)^DKIM-Signature[ \t]*:")
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
_ALIASES = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


def _algorithm(text: str) -> str:
    """rsa-sha256 | ed25519-sha256, also written rsa | ed25519 (the key type)."""
    value = _ALIASES.get(text.lower(), text.lower())
    if value not in ALGORITHMS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(ALGORITHMS)} "
                                         "(or rsa, ed25519)")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dkim", help="DKIM tools: sign, verify, keygen")
    dsub = p.add_subparsers(dest="dkim_command", required=True)
    s = dsub.add_parser("sign", help="sign the message on stdin")
    s.add_argument("--domain", required=True)
    s.add_argument("--selector", required=True)
    s.add_argument("--key", required=True, help="private key file (PEM)")
    s.add_argument("--algorithm", type=_algorithm, metavar="{rsa-sha256,ed25519-sha256}",
                   help="default: from the key")
    s.add_argument("--canon", default="relaxed/relaxed",
                   choices=["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"])
    s.set_defaults(func=_sign)
    v = dsub.add_parser("verify", help="verify the signatures of the message on stdin")
    v.add_argument("--key-record", help='use this TXT record instead of DNS, e.g. "v=DKIM1; k=rsa; p=..."')
    v.add_argument("--dns", metavar="IP:PORT", help="DNS server for the key lookup")
    v.set_defaults(func=_verify)
    k = dsub.add_parser("keygen", help="write a new key and print its DNS record")
    k.add_argument("--domain", required=True)
    k.add_argument("--selector", required=True)
    k.add_argument("--algorithm", type=_algorithm, default="rsa-sha256",
                   metavar="{rsa-sha256,ed25519-sha256}", help="default: rsa-sha256")
    k.add_argument("--bits", type=int, default=2048)
    k.add_argument("--out", help="key file (default: SELECTOR._domainkey.DOMAIN.pem)")
    k.set_defaults(func=_keygen)


def _sign(args: argparse.Namespace) -> int:
    try:
        key = load_key(args.key, args.domain, args.selector, args.algorithm)
        spec = SignSpec(key, canon=args.canon)
    except DkimConfigError as exc:
        print(f"mta dkim sign: {exc}", file=sys.stderr)
        return 1
    with Signer(1) as signer:
        try:
            signed = signer.sign(sys.stdin.buffer.read(), [spec])
        except DkimError as exc:
            print(f"mta dkim sign: {exc}", file=sys.stderr)
            return 1
    sys.stdout.buffer.write(signed)
    return 0


def _dnsfunc(args: argparse.Namespace):
    if args.key_record:
        record = args.key_record.encode()
        return lambda name, timeout=5: record
    import dns.resolver
    resolver = dns.resolver.Resolver(configure=args.dns is None)
    if args.dns:
        host, _, port = args.dns.rpartition(":")
        resolver.nameservers, resolver.port = [host.strip("[]")], int(port)

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except Exception:
            return b""
        return b"".join(b"".join(r.strings) for r in answer)
    return lookup


def _verify(args: argparse.Namespace) -> int:
    try:
        import dkim
    except ImportError:
        print("mta dkim verify: needs the dkimpy package (pip install dkimpy)", file=sys.stderr)
        return 1
    message = sys.stdin.buffer.read()
    count = len(_SIG.findall(message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]))
    if not count:
        print("no DKIM-Signature header")
        return 1
    dnsfunc = _dnsfunc(args)
    ok_all = True
    for i in range(count):
        d = dkim.DKIM(message)
        try:
            ok = d.verify(idx=i, dnsfunc=dnsfunc)
            why = "" if ok else "signature does not verify"
        except Exception as exc:   # hostile input: a key of another type, a bad tag, ...
            ok, why = False, " ".join(str(exc).split()) or type(exc).__name__
        tags = d.signature_fields if hasattr(d, "signature_fields") else {}
        dom = tags.get(b"d", b"?").decode(errors="replace")
        sel = tags.get(b"s", b"?").decode(errors="replace")
        alg = tags.get(b"a", b"?").decode(errors="replace")
        print(f"signature {i + 1}: d={dom} s={sel} a={alg}: {'pass' if ok else 'fail'}"
              f"{'' if ok else ' (' + why + ')'}")
        ok_all &= bool(ok)
    return 0 if ok_all else 1


def _keygen(args: argparse.Namespace) -> int:
    out = args.out or f"{args.selector}._domainkey.{args.domain}.pem"
    key_type = args.algorithm.split("-")[0]          # rsa-sha256 -> rsa
    try:
        pem, public = keygen(key_type, args.bits)
    except ValueError as exc:
        print(f"mta dkim keygen: {exc}", file=sys.stderr)
        return 1
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"mta dkim keygen: {out} exists; not overwriting a key", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(f"; private key written to {out} (mode 0600)", file=sys.stderr)
    print(dns_record(args.selector, args.domain, key_type, public))
    return 0
