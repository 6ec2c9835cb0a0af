"""Envelope and Recipient: what a message was sent with, as stages pass it.

Where it sits: built once by reception (ingest) from the SMTP transaction or an
injection, stored by the spool as the JSON head of the MESSAGE record, and read
back (from the spool's hot cache or one pread) when an attempt starts; the
scheduler, dispatcher, outcomes, DSN builder, bounce intake and the operator
views read its attributes. The queue never holds it: a waiting message is the
compact QueuedMessage (mta/model/queued.py), the envelope stays on disk.
Read-only once stored: the spool's hot cache hands one object to every reader.

Reads and writes: `to_json()`/`from_json()` are the spool's envelope format,
unchanged from the dict the stages used to pass: a compact JSON object with
the keys id, sender, rcpts ([address, NOTIFY, ORCPT] per recipient), helo,
client_ip, client_port, listener, protocol, received, size, body, smtputf8, ret,
envid, and tenant, campaign, class, headers only when reception found them,
requiretls and tls_optional (RFC 8689, both true or absent: absent reads false).
A message received over SMTP is written byte for byte as before; one injected
by an older version (no MAIL parameters) reads with their defaults.

Diagnostics: `from_json` raises EnvelopeError (a ValueError) for bytes that are
not such an object: not JSON, no id, sender or rcpts (what delivery cannot do
without), a recipient that is not [address, NOTIFY, ORCPT]; spool recovery
quarantines that record like any other damage. The other keys describe where
the message came from and read as "unknown" ("", 0) when absent. Keys it does
not know are ignored: they come from a newer version (read after a downgrade),
and the record on disk, never rewritten, keeps them; refusing them would
quarantine accepted mail.

Trust: values come from our own CRC-checked records; the addresses and
parameters in them were checked by the SMTP core when they arrived.
RFCs: 3461 (NOTIFY, ORCPT, RET, ENVID), 6152 (BODY), 6531 (SMTPUTF8), 8689 (REQUIRETLS:
`requiretls` means deliver only over verified TLS or bounce; `tls_optional` means the
sender's "TLS-Required: No" asks outbound to ignore TLS policy failures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


class EnvelopeError(ValueError):
    """Bytes that are not an envelope: a damaged or foreign spool record."""


@dataclass(slots=True)
class Recipient:
    address: str                # RCPT TO address as received (SMTPUTF8 addresses as text)
    notify: str | None = None   # NOTIFY= as received ("SUCCESS,FAILURE", "NEVER"); None: not given
    orcpt: str | None = None    # ORCPT= as received ("rfc822;xtext"); None: not given

    @property
    def domain(self) -> str:
        """Lower-case text after the last "@" (a bare "postmaster" is its own)."""
        return self.address.rpartition("@")[2].lower()


@dataclass(slots=True)
class Envelope:
    id: str                          # spool id, text form (mta/model/ids.py)
    sender: str                      # MAIL FROM address; "" for the null sender
    recipients: list[Recipient]      # in RCPT order; an index names a recipient for good
    helo: str = ""                   # EHLO/HELO name the client gave ("localhost" for inject)
    client_ip: str = ""              # peer address of the session
    client_port: int = 0             # peer port; 0 for inject
    listener: str = ""               # listener name; "inject" for Server.inject()
    protocol: str = ""               # "SMTP", "ESMTP", "UTF8SMTP", with S (TLS) or SA (TLS and
                                     # AUTH) after them (RFC 3848), or "local" (Received: with)
    received: float = 0.0            # wall time of acceptance (epoch seconds)
    size: int = 0                    # bytes stored: our Received header plus the content
    body: str = ""                   # MAIL BODY= ("7BIT", "8BITMIME"); "": not given
    smtputf8: bool = False           # MAIL SMTPUTF8 was given
    ret: str | None = None           # MAIL RET= ("FULL", "HDRS"); None: not given
    envid: str | None = None         # MAIL ENVID= as received (xtext); None: not given
    tenant: str | None = None        # tenant header value; None: no such header
    campaign: str | None = None      # campaign header value; None: no such header
    queue_class: str | None = None   # queue class header value (JSON key "class")
    headers: dict[str, str] | None = None   # header name -> value that egress rules match on
    requiretls: bool = False         # MAIL REQUIRETLS (RFC 8689), accepted over TLS only
    tls_optional: bool = False       # "TLS-Required: No" header (RFC 8689 5), without REQUIRETLS

    def to_json(self) -> bytes:
        """The spool's envelope bytes (compact JSON, the historic key order)."""
        d: dict[str, Any] = {
            "id": self.id, "sender": self.sender,
            "rcpts": [(r.address, r.notify, r.orcpt) for r in self.recipients],
            "helo": self.helo, "client_ip": self.client_ip, "client_port": self.client_port,
            "listener": self.listener, "protocol": self.protocol, "received": self.received,
            "size": self.size, "body": self.body, "smtputf8": self.smtputf8, "ret": self.ret,
            "envid": self.envid}
        if self.tenant is not None:
            d["tenant"] = self.tenant
        if self.campaign is not None:
            d["campaign"] = self.campaign
        if self.queue_class is not None:
            d["class"] = self.queue_class
        if self.headers is not None:
            d["headers"] = self.headers
        if self.requiretls:
            d["requiretls"] = True
        if self.tls_optional:
            d["tls_optional"] = True
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, data: bytes | bytearray | memoryview) -> Envelope:
        """Parse the spool's envelope bytes; EnvelopeError when they are not one."""
        try:
            d = orjson.loads(data)
            get = d.get
            return cls(d["id"], d["sender"], [Recipient(*r) for r in d["rcpts"]],
                       get("helo", ""), get("client_ip", ""), get("client_port", 0),
                       get("listener", ""), get("protocol", ""), get("received", 0.0),
                       get("size", 0), get("body") or "", bool(get("smtputf8")), get("ret"),
                       get("envid"), get("tenant"), get("campaign"), get("class"), get("headers"),
                       bool(get("requiretls")), bool(get("tls_optional")))
        except orjson.JSONDecodeError as exc:
            raise EnvelopeError(f"envelope is not JSON: {exc}") from None
        except KeyError as exc:
            raise EnvelopeError(f"envelope has no {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:   # not an object, a recipient not a triple
            raise EnvelopeError(f"envelope is malformed: {exc}") from None

    def view(self) -> dict[str, Any]:
        """The envelope as the admin API and `mta queue` show it (the stored JSON)."""
        return orjson.loads(self.to_json())
