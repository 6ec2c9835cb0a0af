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


def test_idle_source_site_dispatchers_are_forgotten(tmp_path, monkeypatch):
    """With thousands of sources the (source, site) pairs would only accumulate:
    the engine drops dispatchers that had nothing to do for REAP_AFTER seconds."""
    import subprocess
    import sys

    from conftest import ROOT
    from mta.delivery import engine as engine_mod
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"),
                             f"127.0.0.1:{sink_port}"], stdout=subprocess.PIPE)
    assert b"ready" in sink.stdout.readline()
    sources = "".join(f'[[source]]\nname = "s{i}"\naddress = "127.1.2.{i + 1}"\n' for i in range(4))
    cfg = mta.config.parse_config(
        f'[spool]\ndirectory = "{tmp_path}/spool"\n[log]\ndirectory = "{tmp_path}/log"\n'
        f'[admin]\nlisten = ""\n[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[delivery]\nsmarthost = "127.0.0.1:{sink_port}"\nidle_timeout = "0s"\n{sources}'
        f'[[listener]]\nport = {free_port()}\n')

    async def run() -> tuple[int, int, int]:
        async with mta.Server(cfg) as server:
            for i in range(8):
                await server.inject("a@example.com", [f"b{i}@example.org"], b"Subject: x\r\n\r\nhi\r\n")
            for _ in range(200):
                if server.delivery.outcomes.counters["delivered"] == 8:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            engine = server.delivery
            before = len(engine.dispatchers)
            monkeypatch.setattr(engine_mod, "REAP_AFTER", 0.0)
            engine._reap()
            return before, len(engine.dispatchers), len(engine.sites)

    try:
        before, after, sites = asyncio.run(run())
    finally:
        sink.terminate()
        sink.communicate(timeout=10)
    assert before == 4, f"got {before} dispatchers, want one per source (4)"
    assert (after, sites) == (0, 0), f"got {after} dispatchers and {sites} sites after reaping"
