"""One inbound SMTP session at a simulated provider's MX (asyncio streams).

The provider is the one whose MX address the client connected to; the source is the
client's address. Each step asks the model (model.py) and answers with the provider's
reply text; a 421 closes the connection, as RFC 5321 3.8 says. Everything from the client
is bounded: line length (StreamReader limit), message size, recipients per transaction
and idle time per command.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import ssl
from typing import TYPE_CHECKING

from .config import HOUR, Provider, Reply
from .model import ACCEPT, DEFER

if TYPE_CHECKING:
    from .server import Simulator

MAX_LINE = 8192           # bytes per command or text line (RFC 5321 asks for 1,000)
MAX_MESSAGE = 50 * 1024 * 1024
COMMAND_TIMEOUT = 300.0
ADDRESS = re.compile(r"^(?:MAIL FROM|RCPT TO):\s*<([^<>\s]*)>", re.IGNORECASE)

_fixed = {code: Reply.parse(text, "fixed") for code, text in {
    "ok": "250 2.0.0 OK", "mail": "250 2.1.0 Sender OK", "rcpt": "250 2.1.5 Recipient OK",
    "data": "354 Start mail input; end with <CRLF>.<CRLF>", "bye": "221 2.0.0 Bye",
    "order": "503 5.5.1 Bad sequence of commands", "syntax": "501 5.5.4 Syntax error in parameters",
    "unknown_cmd": "502 5.5.1 Command not recognized", "too_many": "452 4.5.3 Too many recipients",
    "size": "552 5.3.4 Message too big", "long": "500 5.5.2 Line too long",
    "timeout": "421 4.4.2 Timeout, closing connection", "no_rcpt": "554 5.5.1 No valid recipients",
    "tls": "220 2.0.0 Ready to start TLS",
}.items()}


class Session:
    def __init__(self, sim: Simulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 provider: Provider, mx_name: str) -> None:
        self.sim = sim
        self.reader, self.writer = reader, writer
        self.provider = provider
        self.mx = mx_name
        self.source = writer.get_extra_info("peername")[0]
        self.helo = ""
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.reserved: list[int] = []        # hour of each reserved (accepted) recipient
        self.messages = 0
        self.tls = False

    # --- helpers -------------------------------------------------------------------------

    def values(self, rcpt: str = "", id: str = "") -> dict[str, str]:
        """What a reply text's placeholders are filled with."""
        return {"ip": self.source, "mx": self.mx, "rcpt": rcpt, "domain": rcpt.rpartition("@")[2], "id": id}

    async def reply(self, reply: Reply, rcpt: str = "", id: str = "") -> None:
        self.writer.write(reply.render(**self.values(rcpt, id)))
        await self.writer.drain()

    def event(self, stage: str, outcome: str, reason: str, reply: Reply | None, **extra: str | bool) -> None:
        text = reply.render(**self.values(str(extra.get("rcpt", "")), str(extra.get("id", "")))) if reply else b""
        self.sim.event(source=self.source, provider=self.provider.name, mx=self.mx, stage=stage,
                       outcome=outcome, reason=reason,
                       reply=text.decode().rstrip("\r\n").replace("\r\n", "\n"), **extra)

    def release(self) -> None:
        for hour in set(self.reserved):
            self.sim.model.release(self.source, self.provider, self.reserved.count(hour), hour)
        self.reserved.clear()
        self.mail_from, self.rcpts = None, []

    # --- the session ---------------------------------------------------------------------

    async def run(self) -> None:
        model = self.sim.model
        outcome, reason = model.connect(self.source, self.provider)
        if outcome != ACCEPT:
            r = self.provider.replies[reason]
            self.event("connect", outcome, reason, r)
            await self.reply(r)
            return
        try:
            await self.reply(self.provider.replies["greeting"])
            while await self.command():
                pass
        finally:
            self.release()
            model.disconnect(self.source, self.provider)

    async def readline(self) -> bytes | None:
        try:
            return await asyncio.wait_for(self.reader.readuntil(b"\n"), COMMAND_TIMEOUT)
        except asyncio.LimitOverrunError:
            await self.reply(_fixed["long"])
        except TimeoutError:
            await self.reply(_fixed["timeout"])
        except (asyncio.IncompleteReadError, OSError):      # reset, TLS errors
            pass
        return None

    async def command(self) -> bool:
        """Handle one command; False ends the session."""
        line = await self.readline()
        if line is None:
            return False
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        verb = text[:4].upper()
        if verb in ("EHLO", "HELO"):
            self.helo = text[5:].strip()[:255] or "unknown"
            self.release()
            if verb == "HELO":
                await self.reply(Reply(250, "", (self.mx,)))
            else:
                tls = ("STARTTLS",) if self.sim.tls_context and not self.tls else ()
                await self.reply(Reply(250, "", (self.mx, "PIPELINING", f"SIZE {MAX_MESSAGE}", "8BITMIME",
                                                 *tls, "ENHANCEDSTATUSCODES")))
            return True
        if verb == "MAIL":
            return await self.mail(text)
        if verb == "RCPT":
            return await self.rcpt(text)
        if verb == "DATA":
            return await self.data()
        if text.upper() == "STARTTLS":
            return await self.starttls()
        if verb == "RSET":
            self.release()
            await self.reply(_fixed["ok"])
            return True
        if verb == "NOOP":
            await self.reply(_fixed["ok"])
            return True
        if verb == "QUIT":
            await self.reply(_fixed["bye"])
            return False
        await self.reply(_fixed["unknown_cmd"])
        return True

    async def starttls(self) -> bool:
        """RFC 3207: 220, then the handshake; the client starts over with EHLO."""
        if self.sim.tls_context is None or self.tls:
            await self.reply(_fixed["unknown_cmd"] if self.sim.tls_context is None else _fixed["order"])
            return True
        if self.mail_from is not None:
            await self.reply(_fixed["order"])
            return True
        # bytes pipelined after STARTTLS were sent in plaintext: not to be read as commands
        # after the handshake (the STARTTLS command injection of CVE-2011-0411)
        self.reader._buffer.clear()      # noqa: SLF001  (asyncio offers no public way)
        await self.reply(_fixed["tls"])
        try:
            await asyncio.wait_for(self.writer.start_tls(self.sim.tls_context), 30)
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError):
            return False
        self.tls = True
        self.helo = ""
        self.release()
        return True

    async def mail(self, text: str) -> bool:
        if not self.helo or self.mail_from is not None:
            await self.reply(_fixed["order"])
            return True
        m = ADDRESS.match(text)
        if not m:
            await self.reply(_fixed["syntax"])
            return True
        if self.messages >= self.provider.per_connection:
            r = self.provider.replies["per_connection"]
            self.event("mail", DEFER, "per_connection", r)
            await self.reply(r)
            return r.code != 421
        self.mail_from = m.group(1)
        await self.reply(_fixed["mail"])
        return True

    async def rcpt(self, text: str) -> bool:
        if self.mail_from is None:
            await self.reply(_fixed["order"])
            return True
        m = ADDRESS.match(text)
        if not m or "@" not in m.group(1):
            await self.reply(_fixed["syntax"])
            return True
        rcpt = m.group(1)
        if len(self.rcpts) >= self.provider.max_rcpts:
            await self.reply(_fixed["too_many"])
            return True
        outcome, reason = self.sim.model.rcpt(self.source, self.provider, self.mail_from, rcpt)
        if outcome == ACCEPT:
            self.rcpts.append(rcpt)
            self.reserved.append(int(self.sim.model.clock.now() // HOUR))
            await self.reply(_fixed["rcpt"])
            return True
        r = self.provider.replies[reason]
        self.event("rcpt", outcome, reason, r, sender=self.mail_from, rcpt=rcpt)
        await self.reply(r, rcpt=rcpt)
        return r.code != 421

    async def data(self) -> bool:
        if self.mail_from is None:
            await self.reply(_fixed["order"])
            return True
        if not self.rcpts:
            await self.reply(_fixed["no_rcpt"])
            return True
        await self.reply(_fixed["data"])
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await self.readline()
            if line is None:
                return False
            if line in (b".\r\n", b".\n"):
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size <= MAX_MESSAGE:
                chunks.append(line)
        if size > MAX_MESSAGE:
            self.release()
            await self.reply(_fixed["size"])
            return True
        content = b"".join(chunks)
        queue_id = secrets.token_hex(6)
        sender, rcpts = self.mail_from, list(self.rcpts)
        self.reserved.clear()         # the units are used now, not released
        self.mail_from, self.rcpts = None, []
        self.messages += 1
        complainers = self.sim.model.accepted(self.source, self.provider, rcpts, queue_id)
        r = self.provider.replies["accepted"]
        for rcpt in rcpts:
            self.event("data", "accepted", "", r, sender=sender, rcpt=rcpt, id=queue_id, tls=self.tls)
        for rcpt in complainers:
            self.sim.complain(self.provider, self.source, sender, rcpt, content)
        await self.reply(r, id=queue_id)
        return True
