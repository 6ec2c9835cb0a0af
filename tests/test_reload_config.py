"""Server.reload() in-process: restart-only keys keep their running value (named in the
result), a config with problems is refused whole, a good one reaches live components."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from mta.config import parse_config
from mta.config.schema import SECTIONS, keys_of
from mta.egress.shaping import KEYS as SHAPING_KEYS
from mta.server import RELOADED, Server, keep_restart_keys


def _config(tmp_path, extra: str = "", segment: str = "64MiB"):
    return parse_config(
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\nsegment_size = "{segment}"\n'
        f'[log]\ndirectory = "{tmp_path / "log"}"\n[admin]\nlisten = ""\n'
        f'[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[[listener]]\naddress = "127.0.0.1"\nport = 1\n{extra}\n', str(tmp_path / "mta.toml"),
        base_dir=tmp_path)


def test_every_key_is_reloaded_or_needs_a_restart():
    """A new key must say which: restart=True in the schema, or applied by Server.reload
    (listed in mta.server.RELOADED); else a reload would claim to apply it and not."""
    wrong = []
    for sec in SECTIONS:
        for name, k in keys_of(sec.cls).items():
            reloaded = f"{sec.name}.{name}" in RELOADED or f"{sec.name}.*" in RELOADED
            if reloaded == k.restart:
                wrong.append(f"{sec.name}.{name}")
    assert not wrong, f"keys neither reloaded nor restart=True (or both): {wrong}"
    shaped = {k[len("delivery."):] for k in RELOADED if k.startswith("delivery.")}
    assert shaped - {"ehlo_name", "shutdown_grace"} <= set(SHAPING_KEYS)


def test_keep_restart_keys(tmp_path):
    old = _config(tmp_path)
    new = _config(tmp_path, '[delivery]\nconnection_limit = 7\nhold = true\n', segment="8MiB")
    merged, changed = keep_restart_keys(old, new)
    assert changed == ["spool.segment_size", "delivery.hold"]
    assert merged.spool.segment_size == old.spool.segment_size
    assert merged.delivery.hold is False
    assert merged.delivery.connection_limit == 7      # reloadable: the new value


def test_reload_refuses_a_bad_config_and_applies_a_good_one(tmp_path):
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('["default"]\nconnection_limit = 3\n')

    async def main() -> None:
        cfg = _config(tmp_path, f'[egress]\nshaping = ["{shaping}"]\n')
        cfg = dataclasses.replace(cfg, listener=())   # no SMTP needed here
        server = Server(cfg)
        await server.start()
        try:
            shaping.write_text('["default"]\nconnection_limit = 0\n')
            bad = server.reload(cfg)
            assert bad["applied"] is False and "connection_limit" in bad["problems"][0]
            assert server.delivery.shaping.limits("default", "x.test", ["mx.x.test"]) \
                .connection_limit == 3
            shaping.write_text('["default"]\nconnection_limit = 5\n')
            good = server.reload(cfg)
            assert good["applied"] is True
            assert server.delivery.limits.shaping.limits("default", "x.test", ["mx.x.test"]) \
                .connection_limit == 5
            await asyncio.sleep(0.2)                  # the open runs in the writer thread
            assert server.logs.reopened == 1
            # sources, pools and classes: swapped; an operator's suspension stays
            server.delivery.egress.sources["default"].suspended_until = 4e9
            more = _config(tmp_path, f'[egress]\nshaping = ["{shaping}"]\n'
                                     '[[queue_class]]\nname = "newsletters"\nweight = 3\n')
            more = dataclasses.replace(more, listener=())
            assert server.reload(more) == {"applied": True, "problems": [], "restart": []}
            assert server.delivery.egress.classes["newsletters"].weight == 3
            assert server.delivery.egress.sources["default"].suspended_until == 4e9
            missing = _config(tmp_path, '[[dkim]]\ndomain = "x.test"\nselector = "s"\n'
                                        f'key_file = "{tmp_path / "nokey.pem"}"\n')
            refused = server.reload(missing)
            assert refused["applied"] is False and "dkim[0]" in refused["problems"][0]
        finally:
            await server.stop()

    asyncio.run(main())


def test_reload_refused_while_a_bounce_rules_file_is_bad(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "mine"\ncode = 550\ncategory = "invalid_recipient"\nhard = true\n')

    async def main() -> None:
        cfg = dataclasses.replace(_config(tmp_path, f'[bounces]\nrules = ["{rules}"]\n'),
                                  listener=())
        server = Server(cfg)
        await server.start()
        try:
            rules.write_text('[[rule]]\nname = "mine"\ncode = "sometimes"\n')
            os.utime(rules, (time.time() + 5, time.time() + 5))   # a new mtime, surely
            out = server.reload(cfg)
            assert out["applied"] is False and "[bounces] rules" in out["problems"][0]
        finally:
            await server.stop()

    asyncio.run(main())
