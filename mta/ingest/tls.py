"""Inbound TLS: a listener's certificate, and the RFC 8689 fields of the envelope.

Where it sits: Listener (listener.py) holds one ServerTls when `tls_cert` is set; its
context serves STARTTLS (RFC 3207) and implicit TLS listeners (RFC 8314), and reload()
(SIGHUP, Server.reload) reads the certificate and key again (an implicit listener's
socket keeps its context and switches to the current one per handshake, front()): new handshakes get the
new certificate, sessions already encrypted keep theirs. A pair that does not load
keeps the old context and the problem is reported.
Reception (reception.py) asks tls_optional() about every message's header block
("TLS-Required: No", RFC 8689 5: one bounded find when absent, ~1 us for a 1.3 KB
header block) and calls tls_fields() (REQUIRETLS and the AUTH user's tenant, for TLS
sessions only; REQUIRETLS makes the header field ignored).
Policy: TLS 1.2 or later, ssl.create_default_context(Purpose.CLIENT_AUTH)'s ciphers
(forward-secret AEAD first, no RC4/3DES/export), no compression, no renegotiation,
no client certificates asked; one TLS 1.3 session ticket per handshake (resumption
stays possible, the second ticket was CPU for nothing).
"""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context; ssl.SSLError or OSError when the pair does not load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_NONE
    # TLS 1.3: one session ticket per handshake, not OpenSSL's two. Each costs the server
    # ~20-30 us of CPU (encrypt and MAC a serialised session, a record) in a ~300 us
    # handshake, and a ticket is reusable (no anti-replay without early data), so one lets a
    # client resume as many connections as it likes (bench/tls_relay_bench.py A/B).
    ctx.num_tickets = 1
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


def tls_optional(content, stop: int) -> bool:
    """The header block, content[:stop], has "TLS-Required: No" (RFC 8689 5). Called by
    reception for every message, where the header block's end is known already: one
    bounded find when the field is absent."""
    at = content.find(b"equired:", 0, stop)
    if at < 0:   # (all-caps "TLS-REQUIRED" is not looked for: the fail-safe side)
        return False
    start = content.rfind(b"\n", 0, at) + 1
    end = content.find(b"\n", at, stop)
    line = bytes(content[start:end if end >= 0 else stop]).lower()
    name, _, value = line.partition(b":")
    return name.rstrip(b" \t") == b"tls-required" and value.strip() == b"no"


def tls_fields(txn, x_values: dict[str, Any]) -> None:
    """Add the envelope fields TLS and AUTH give `txn` to `x_values` (the X-header values
    reception read, tls_optional among them)."""
    if txn.tls:
        if txn.auth_tenant is not None:   # the user's tenant, not the X-Tenant header
            x_values["tenant"] = txn.auth_tenant
        if txn.requiretls:                # RFC 8689 5: the header field is ignored
            x_values["requiretls"] = True
            x_values.pop("tls_optional", None)
