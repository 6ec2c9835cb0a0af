"""ARF complaint reports (RFC 5965) and the SMTP client that mails them to the bounce domain.

A report is multipart/report; report-type=feedback-report with three parts: a human
note, the message/feedback-report fields (Feedback-Type: abuse, Original-Mail-From,
Original-Rcpt-To, Source-IP, ...) and text/rfc822-headers with the original's header
block, a Return-Path carrying its MAIL FROM stamped on top as a receiving MTA does
(RFC 5321 4.4): that Return-Path is what the sender's feedback intake keys on.
"""
from __future__ import annotations

import asyncio
import email.utils
import secrets
import smtplib

MAX_HEADERS = 64 * 1024    # bytes of the original's header block quoted in a report


def header_block(data: bytes) -> bytes:
    """The original's header block (up to the first empty line), at most MAX_HEADERS bytes."""
    end = data.find(b"\r\n\r\n")
    block = data[: end + 2] if end >= 0 else data
    if len(block) > MAX_HEADERS:
        block = block[:MAX_HEADERS]
        block = block[: block.rfind(b"\r\n") + 2]
    return block


def build(*, reporter: str, to: str, source: str, mail_from: str, rcpt: str, headers: bytes,
          arrival: float) -> bytes:
    """The report's bytes (CRLF line ends)."""
    boundary = "arf_" + secrets.token_hex(8)
    date = email.utils.formatdate(arrival)
    domain = mail_from.rpartition("@")[2] or "unknown"
    lines = [
        f"From: <{reporter}>",
        f"To: <{to}>",
        f"Subject: complaint about message from {source}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{secrets.token_hex(12)}@{reporter.rpartition('@')[2]}>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is an email abuse report for an email message received from IP {source} on {date}.",
        "A user of this mailbox provider marked it as spam.",
        "",
        f"--{boundary}",
        "Content-Type: message/feedback-report",
        "",
        "Feedback-Type: abuse",
        "User-Agent: isp-sim/1.0",
        "Version: 1",
        f"Original-Mail-From: <{mail_from}>",
        f"Original-Rcpt-To: <{rcpt}>",
        f"Arrival-Date: {date}",
        f"Reported-Domain: {domain}",
        f"Source-IP: {source}",
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(lines).encode() + b"\r\n"
    original = f"Return-Path: <{mail_from}>\r\n".encode() + header_block(headers)
    return head + original + f"\r\n--{boundary}--\r\n".encode()


class Mailer:
    """Sends reports one by one (smtplib in a worker thread) to host:port; a bounded
    backlog: beyond `limit` waiting reports, new ones are dropped and counted."""

    def __init__(self, host_port: str, on_done, limit: int = 10000) -> None:
        host, _, port = host_port.rpartition(":")
        self.host, self.port = host, int(port)
        self.queue: asyncio.Queue = asyncio.Queue(limit)
        self.on_done = on_done          # callback(report_meta, error or "")
        self.dropped = 0
        self.pending = 0                # submitted, not yet sent or failed
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, meta: dict, sender: str, to: str, data: bytes, bind: str) -> None:
        try:
            self.queue.put_nowait((meta, sender, to, data, bind))
            self.pending += 1
        except asyncio.QueueFull:
            self.dropped += 1
            self.on_done(meta, "backlog full: dropped")

    async def _run(self) -> None:
        while True:
            meta, sender, to, data, bind = await self.queue.get()
            try:
                await asyncio.to_thread(self._send, sender, to, data, bind)
                error = ""
            except (OSError, smtplib.SMTPException) as e:
                error = f"{type(e).__name__}: {e}"[:300]
            self.pending -= 1
            self.on_done(meta, error)

    def _send(self, sender: str, to: str, data: bytes, bind: str) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=20, source_address=(bind, 0)) as s:
            s.sendmail(sender, [to], data)

    async def stop(self, grace: float = 5.0) -> None:
        """Send what is queued (for up to `grace` seconds), then stop."""
        if self.task is None:
            return
        try:
            async with asyncio.timeout(grace):
                while self.pending:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
