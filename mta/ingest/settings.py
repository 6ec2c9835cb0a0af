"""Builds the native core's per-listener settings from a listener's config.

The reply lines come from mta.model.replies (the one reply table); slots that are
fixed per listener (our hostname, the SIZE limit) are filled here once, and
the one slot that varies per session (the client's HELO name) stays "{}".
"""
from __future__ import annotations

from mta._native.wire import ServerSettings
from mta.model.replies import REPLIES, ehlo_lines, reply


def server_settings(hostname: str, banner: str, *, bare_newline: str = "reject",
                    max_message_size: int = 50 << 20, max_line_length: int = 2048,
                    max_recipients: int = 1000, max_errors: int = 10,
                    max_junk_commands: int = 100,
                    max_messages_per_session: int = 1000, starttls: bool = False,
                    auth: bool = False, require_tls: bool = False,
                    scram: bool = False) -> ServerSettings:
    """`starttls`: offer STARTTLS (plaintext sessions); `auth`: offer AUTH PLAIN LOGIN once
    encrypted (and SCRAM-SHA-256 first with `scram`: every user has SCRAM keys, auth.py);
    `require_tls`: refuse MAIL before TLS. REQUIRETLS is offered over TLS."""
    lines = {name: r.line() for name, r in REPLIES.items() if "{}" not in r.text}
    for name, r in REPLIES.items():
        if "{}" in r.text:
            lines[name] = r.line(*([hostname] * r.text.count("{}")))
    lines["GREETING"] = reply("GREETING", hostname, banner)
    lines["HELO_OK"] = reply("HELO_OK", hostname, "{}")
    lines["EHLO"] = ehlo_lines(hostname, "{}", max_message_size,
                               ("STARTTLS",) if starttls else ())
    lines["EHLO_TLS"] = ehlo_lines(hostname, "{}", max_message_size,
                                   ((("AUTH SCRAM-SHA-256 PLAIN LOGIN" if scram else
                                      "AUTH PLAIN LOGIN"),) if auth else ()) + ("REQUIRETLS",))
    lines["CHUNK_OK"] = REPLIES["CHUNK_OK"].line("{}")
    settings = ServerSettings(
        hostname, lines, bare_newline=bare_newline, max_message_size=max_message_size,
        max_line_length=max_line_length, max_recipients=max_recipients,
        max_errors=max_errors, max_junk_commands=max_junk_commands,
        max_messages_per_session=max_messages_per_session)
    settings.starttls = starttls
    settings.auth = auth
    settings.require_tls = require_tls
    return settings
