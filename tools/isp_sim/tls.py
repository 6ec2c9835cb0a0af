"""STARTTLS for the simulated MX hosts: a self-signed certificate made at start.

The big providers all offer STARTTLS and some MTA rules require it (the shipped Google
rule says tls = "required"); an MTA encrypting opportunistically (RFC 7435) does not
check the certificate, so a throw-away self-signed one naming every MX host is enough.
Needs the `cryptography` package (requirements-dkim.txt).
"""
from __future__ import annotations

import datetime
import ssl
import tempfile
from pathlib import Path


def self_signed_context(names: list[str]) -> ssl.SSLContext:
    """A server context with a fresh EC P-256 key and a certificate for `names` (30 days)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "isp-sim")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="isp-sim-tls-") as d:
        cert_path, key_path = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
