"""The embeddable API: an asyncio program starts mta.Server, injects, stops,
and a restarted Server finds the message again (no CLI involved)."""
from __future__ import annotations

import asyncio
import smtplib

import mta
from conftest import free_port


def _config(tmp_path, port):
    return mta.config.parse_config(
        f'[spool]\ndirectory = "{tmp_path}/spool"\n[log]\ndirectory = "{tmp_path}/log"\n'
        f'[admin]\nlisten = ""\n[dns]\nnameservers = ["127.0.0.1:9"]\n'  # never leave loopback
        f'[[listener]]\nport = {port}\n')


def test_embedded_server_injects_and_recovers(tmp_path):
    port = free_port()
    content = b"From: a@example.com\r\nSubject: embedded\r\n\r\nhello\r\n"

    async def first() -> tuple[str, str]:
        async with mta.Server(_config(tmp_path, port)) as server:
            assert server.addresses == [("127.0.0.1", port)]
            injected = await server.inject("a@example.com", ["b@example.org"], content)

            def smtp() -> str:   # a real client against the embedded listener
                with smtplib.SMTP("127.0.0.1", port) as s:
                    code, text = s.sendmail("c@example.com", ["d@example.org"], content) or (250, b"")
                    return s.noop()[1].decode()
            await asyncio.get_running_loop().run_in_executor(None, smtp)
            return injected, ""

    injected, _ = asyncio.run(first())

    async def second() -> list[bytes]:
        async with mta.Server(_config(tmp_path, port)) as server:
            return server.spool.ids()

    ids = [i.hex() for i in asyncio.run(second())]
    assert injected in ids, f"got {ids}, want the injected message back after a restart"
    assert len(ids) == 2, f"got {len(ids)} messages, want the injected and the SMTP one"


def test_public_api_is_small():
    assert set(mta.__all__) == {"Config", "ConfigError", "Server", "SpoolError", "load_config",
                                "__version__"}
