"""The native core's MAIL hook as Reception wires it: spool backpressure and the memory
budget refuse new transactions with their 4xx, not counted as client errors."""
from __future__ import annotations

import asyncio

from mta._native.wire import ServerCore
from mta.config import parse_config
from mta.ingest.reception import Reception
from mta.ingest.settings import server_settings
from mta.model.replies import reply
from test_governor import Session


class Spool:
    """The part of mta.spool.Spool the MAIL hook reads."""

    def __init__(self):
        self.verdict = None

    def admission(self):
        return self.verdict


def test_mail_refused_while_the_spool_or_memory_cannot_take_mail():
    async def run():
        spool = Spool()
        reception = Reception(parse_config('[server]\ndata_memory_budget = "1MiB"\n'), spool, None)
        settings = server_settings("mx.test", "t", max_errors=3)
        settings.mail_check = reception.mail_check
        core = ServerCore(settings, True)
        core.feed(b"EHLO c\r\n")
        spool.verdict = "SPOOL_FULL"
        for _ in range(5):                       # more than max_errors: never disconnected
            out, _ = core.feed(b"MAIL FROM:<a@s.test>\r\n")
            assert out == reply("SPOOL_FULL")
        assert not core.closed and core.rejections[-1] == ("SPOOL_FULL", "a@s.test", [])
        spool.verdict = None
        holder = Session()
        reception.memory.charge(holder, 1 << 20)
        out, _ = core.feed(b"MAIL FROM:<a@s.test>\r\n")
        assert out == reply("MEMORY_FULL") and out.startswith(b"452 4.3.1")
        reception.memory.release(holder)
        out, _ = core.feed(b"MAIL FROM:<a@s.test>\r\n")
        assert out == reply("SENDER_OK")
    asyncio.run(run())
