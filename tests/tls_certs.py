"""Test certificates made with `cryptography`: a CA, leaves for names (valid, expired,
wrong name), written as PEM files for ssl contexts. Shared by the outbound TLS tests."""
from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]      # leaf first, then intermediates (not the root)

    @property
    def der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.chain]

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        cert = directory / f"{name}.crt"
        key = directory / f"{name}.key"
        cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain))
        key.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert, key

    def server_context(self, directory: Path, name: str) -> ssl.SSLContext:
        cert, key = self.write(directory, name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    """A self-signed root CA (and optionally an intermediate) issuing server certificates."""

    def __init__(self, cn: str = "mta test root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                  False, False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path

    def issue(self, *names: str, expired: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=90)
        cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Issued(cert, key, [cert])


def txt_dns_server(records: list[str]):
    """tools/dnsserver.DnsServer that also takes records with quotes (TXT): unbound's
    local-data line is single-quoted for those. Started; call .stop()."""
    from dnsserver import DnsServer

    class _TxtDnsServer(DnsServer):
        def config(self) -> str:
            saved = self.records
            quoted = [r for r in saved if '"' in r]
            self.records = [r for r in saved if '"' not in r]
            try:
                text = super().config()
            finally:
                self.records = saved
            extra = "".join(f"    local-data: '{r}'\n" for r in quoted)
            return text.replace("remote-control:", extra + "remote-control:", 1)

    return _TxtDnsServer(records).start()


async def https_policy_server(host: str, issued: Issued, directory: Path, body: str,
                              content_type: str = "text/plain", status: int = 200):
    """aiohttp serving `body` at /.well-known/mta-sts.txt on host:443 with `issued`'s
    certificate. Returns the runner (await runner.cleanup()); `hits` counts requests."""
    from aiohttp import web
    hits = []

    async def policy(request):
        hits.append(request.path)
        return web.Response(body=body.encode(), status=status,
                            headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/.well-known/mta-sts.txt", policy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 443, ssl_context=issued.server_context(directory, "https"))
    await site.start()
    return PolicyServer(runner, hits)


@dataclass
class PolicyServer:
    runner: object
    hits: list

    async def cleanup(self) -> None:
        await self.runner.cleanup()     # type: ignore[attr-defined]


class SignedDnsServer:
    """A validating unbound on loopback serving one DNSSEC-signed zone (signed here with
    dnspython, ECDSA P-256) as an auth-zone, with the zone's key as its trust anchor: its
    answers for the zone carry the AD bit, as a trusted validating resolver's would.
    `records` are zone-file lines relative to or inside `origin`. `unsigned` adds zones
    served unsigned (outside the trust anchor: insecure answers, no AD bit), {origin:
    records}; `bogus` names (relative to `origin`) get their signatures broken after
    signing, so the validator answers SERVFAIL for them."""

    def __init__(self, origin: str, records: list[str], directory: Path, *,
                 unsigned: dict[str, list[str]] | None = None, bogus: tuple[str, ...] = ()) -> None:
        import dns.dnssec
        import dns.zone
        from dnsserver import _free_port, _unbound
        self.origin = origin if origin.endswith(".") else origin + "."
        key = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256,
                                        flags=257)
        text = (f"$ORIGIN {self.origin}\n$TTL 300\n"
                f"@ IN SOA ns.{self.origin} h.{self.origin} 1 3600 600 86400 300\n"
                f"@ IN NS ns.{self.origin}\nns IN A 127.0.0.1\n" + "\n".join(records) + "\n")
        zone = dns.zone.from_text(text, origin=self.origin, relativize=False)
        with zone.writer() as txn:
            dns.dnssec.sign_zone(zone, txn, keys=[(key, dnskey)], lifetime=86400)
        self.dir = directory
        zonefile = directory / "signed.zone"
        text = zone.to_text()
        if bogus:
            owners = {f"{b}.{self.origin}" for b in bogus} | set(bogus)
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if line.split(" ", 1)[0] in owners and " RRSIG " in line \
                        and " RRSIG NSEC " not in line:
                    sig = line.rsplit(" ", 1)[1]
                    mid = len(sig) // 2
                    lines[i] = line[:len(line) - len(sig)] + sig[:mid] + (
                        "A" if sig[mid] != "A" else "B") + sig[mid + 1:]
            text = "\n".join(lines) + "\n"
        zonefile.write_text(f"$ORIGIN {self.origin}\n" + text)
        extra_zones = []
        for n, (zname, zrecords) in enumerate((unsigned or {}).items()):
            zname = zname if zname.endswith(".") else zname + "."
            zpath = directory / f"unsigned{n}.zone"
            zpath.write_text(f"$ORIGIN {zname}\n$TTL 300\n"
                             f"@ IN SOA ns.{zname} h.{zname} 1 3600 600 86400 300\n"
                             f"@ IN NS ns.{zname}\nns IN A 127.0.0.1\n" + "\n".join(zrecords) + "\n")
            extra_zones += ["auth-zone:", f'    name: "{zname}"', f'    zonefile: "{zpath}"',
                            "    for-upstream: yes", "    for-downstream: no"]
        self.port = _free_port("127.0.0.1")
        conf = directory / "unbound-signed.conf"
        conf.write_text("\n".join([
            "server:", "    interface: 127.0.0.1", f"    port: {self.port}", "    do-ip6: no",
            "    do-daemonize: no", '    username: ""', '    chroot: ""',
            f'    directory: "{directory}"', '    pidfile: ""', "    use-syslog: no",
            '    logfile: ""', "    verbosity: 1", "    num-threads: 1",
            '    module-config: "validator iterator"',
            f'    trust-anchor: "{self.origin} DNSKEY {dnskey.to_text()}"',
            "    outgoing-interface: 127.0.0.1", "    access-control: 127.0.0.1/32 allow",
            '    local-zone: "test." nodefault',        # RFC 6761 names are local by default
            "auth-zone:", f'    name: "{self.origin}"', f'    zonefile: "{zonefile}"',
            "    for-upstream: yes", "    for-downstream: no", *extra_zones,
            "remote-control:", "    control-enable: no", ""]))
        import subprocess
        self.log = open(directory / "unbound-signed.log", "wb")
        self.proc = subprocess.Popen([_unbound(), "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        self._wait()

    def _wait(self, timeout: float = 10.0) -> None:
        import time

        import dns.message
        import dns.query
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                q = dns.message.make_query(self.origin, "SOA", want_dnssec=True)
                r = dns.query.udp(q, "127.0.0.1", timeout=0.5, port=self.port)
                if r.answer:
                    return
            except Exception:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"validating unbound did not answer: "
                           f"{(self.dir / 'unbound-signed.log').read_text()[-1000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def tlsa_rdata(cert: x509.Certificate, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    """The TLSA record data for `cert` ("3 1 1 <hex>")."""
    import hashlib
    data = (cert.public_bytes(serialization.Encoding.DER) if selector == 0 else
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return f"{usage} {selector} {mtype} {data.hex()}"
