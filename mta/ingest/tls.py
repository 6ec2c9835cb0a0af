"""Inbound TLS: a listener's certificate, and the RFC 8689 fields of the envelope.

Where it sits: Listener (listener.py) holds one ServerTls when `tls_cert` is set; its
context serves STARTTLS (RFC 3207) and implicit TLS listeners (RFC 8314), and reload()
(SIGHUP, Server.reload) reads the certificate and key again (an implicit listener's
socket keeps its context and switches to the current one per handshake, front()): new handshakes get the
new certificate, sessions already encrypted keep theirs. A pair that does not load
keeps the old context and the problem is reported.
Reception (reception.py) calls tls_fields() for every message: REQUIRETLS and the
AUTH user's tenant (TLS sessions only), and the "TLS-Required: No" header (RFC 8689
5, ignored when REQUIRETLS was given), which costs two bounded finds in the header
block of a plaintext message.
Policy: TLS 1.2 or later, ssl.create_default_context(Purpose.CLIENT_AUTH)'s ciphers
(forward-secret AEAD first, no RC4/3DES/export), no compression, no renegotiation,
no client certificates asked.
"""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

_HEADER_SCAN = 64 << 10


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context; ssl.SSLError or OSError when the pair does not load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx


class ServerTls:
    def __init__(self, cert: Path, key: Path):
        self.cert, self.key = cert, key
        self.context = server_context(cert, key)

    def front(self) -> ssl.SSLContext:
        """The context an implicit TLS server socket is created with: each handshake
        switches to the context loaded last (the SNI callback runs for every
        ClientHello, with or without a server name), so a reload reaches it too."""
        ctx = server_context(self.cert, self.key)

        def switch(sslobj, server_name, current) -> None:
            if self.context is not current:
                sslobj.context = self.context

        ctx.sni_callback = switch
        return ctx

    def reload(self) -> str | None:
        """Load the files again; the problem (the old context stays) or None."""
        try:
            self.context = server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            return f"tls_cert {self.cert}, tls_key {self.key}: {exc}"
        return None


def _tls_optional(content) -> bool:
    """The header block has "TLS-Required: No" (RFC 8689 5)."""
    end = content.find(b"\r\n\r\n", 0, _HEADER_SCAN)
    if end < 0:
        end = min(len(content), _HEADER_SCAN)
    at = content.find(b"equired:", 0, end)
    if at < 0:
        at = content.find(b"EQUIRED:", 0, end)
        if at < 0:
            return False
    start = content.rfind(b"\n", 0, at) + 1
    stop = content.find(b"\n", at, end + 2)
    line = bytes(content[start:stop if stop >= 0 else end]).lower()
    name, _, value = line.partition(b":")
    return name.rstrip(b" \t") == b"tls-required" and value.strip() == b"no"


def tls_fields(txn, x_values: dict[str, Any]) -> None:
    """Add the envelope fields RFC 8689 and AUTH give `txn` to `x_values`."""
    if txn.tls:
        if txn.auth_tenant is not None:   # the user's tenant, not the X-Tenant header
            x_values["tenant"] = txn.auth_tenant
        if txn.requiretls:
            x_values["requiretls"] = True
            return
    if _tls_optional(txn.data):
        x_values["tls_optional"] = True
