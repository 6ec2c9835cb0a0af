"""Suppression entries shared across nodes (mta/feedback/suppression/shared.py, issue 15).

Units: a change encoded and decoded; malformed, oversized and foreign-key records refused
with the reason; the store's own changes by generation (adds and removals, never what it
applied from others); other nodes' changes applied with the cursor, a longer suppression
winning; the stream read's shape checks.
Two "nodes" (a store, its writer thread, a RedisLimits and a SuppressionSync each) on one
redis-server of the test's own, on 127.0.121.x: an entry added on A is in B's store within
seconds, a removal too, nothing echoes, B resumes from its cursor after a restart, and
what A commits while redis-server is down arrives once it is back.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from mta.egress.shared.base import RECORD_MAX
from mta.egress.shared.redis_store import parse_stream_read
from mta.feedback.suppression.shared import (
    ForeignKey,
    Malformed,
    SuppressionSync,
    decode,
    encode,
    key_id,
)
from mta.feedback.suppression.store import Change, SuppressionList, address_hash
from mta.feedback.suppression.writer import SuppressionWriter

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KID = key_id(KEY)
H = address_hash(KEY, "gone@example.com")


def _record(**over) -> dict[str, str]:
    fields = encode(Change(0, H, "global", reason="hard_bounce", created=1700000000,
                           expires=None), "n1", KID)
    fields.update(over)
    return {k: v for k, v in fields.items() if v is not None}


# -- units -------------------------------------------------------------------------------

def test_a_change_round_trips_and_the_key_never_travels():
    assert len(KID) == 16 and KID != key_id(OTHER_KEY)
    assert KEY.hex() not in str(_record())
    change, node = decode(_record(), KID)
    assert node == "n1" and change.hash == H and change.scope == "global"
    assert change.reason == "hard_bounce" and change.expires is None
    assert change.created == 1700000000 and change.source == "shared by node n1"
    tenant = encode(Change(0, H, "tenant:Müller-ltd", reason="complaint", created=5,
                           expires=99), "nodeä", KID)
    assert all(v.isascii() for v in tenant.values())       # the script refuses non-ASCII
    change, node = decode(tenant, KID)
    assert (change.scope, change.expires, node) == ("tenant:Müller-ltd", 99, "nodeä")
    gone, _ = decode(encode(Change(0, H, None, removal=True), "n1", KID), KID)
    assert gone.removal and gone.scope is None


@pytest.mark.parametrize("over", [
    {"v": "2"}, {"v": None}, {"k": "nothex"}, {"op": "put"}, {"h": "ab" * 31},
    {"h": "AB" * 32}, {"s": "everyone"}, {"s": "domain:a b"}, {"r": "Hard Bounce"},
    {"r": "x" * 65}, {"c": "-1"}, {"c": "1" * 13}, {"x": "0"}, {"x": "soon"},
    {"n": ""}, {"n": "a%20b"}, {"n": "x" * 256}, {"s": "tenant:%ff"}, {"r": None},
])
def test_malformed_records_are_refused(over):
    with pytest.raises(Malformed):
        decode(_record(**over), KID)


def test_an_oversized_record_and_another_key():
    with pytest.raises(Malformed):
        decode(None, KID)          # what the stream read gives a record over the bound
    with pytest.raises(ForeignKey):
        decode(_record(k=key_id(OTHER_KEY)), KID)


def test_stream_reads_are_checked_for_shape():
    ok = parse_stream_read(["1-0", "9-0", 1, 0, [["2-0", ["a", "b"]], ["3-1", ["a"]],
                                                 ["4-0", ["x", "y" * RECORD_MAX]],
                                                 ["5-0", ["a", "1", "a", "2"]], ["6-0", []]]],
                           "1-5", 10)
    assert ok.first == "1-0" and ok.last == "9-0" and not ok.gap
    assert [f for _, f in ok.records] == [{"a": "b"}, None, None, None, None]
    # records missed: our last one gone and the oldest left newer; a first read after removals
    assert parse_stream_read(["2-0", "9-0", 0, 5, []], "1-5", 10).gap
    assert not parse_stream_read(["1-0", "9-0", 0, 5, []], "1-5", 10).gap
    assert parse_stream_read(["2-0", "9-0", 0, 5, []], "0-0", 10).gap
    assert not parse_stream_read(["1-0", "9-0", 0, 0, []], "0-0", 10).gap
    for bad in (None, "x", ["1-0", "", 0, 0, "notalist"], ["", "", 0, 0, [["2-0"]]],
                ["", "", 0, 0, [["2-0", []], ["2-0", []]]],     # ids must increase
                ["", "", 0, 0, [["1-0", []]]],                   # ... past the cursor
                ["", "", "0", 0, []], ["", "", 0, 0, [[5, []]]],
                ["", "", 0, 0, [["a", "b"]] * 11]):
        with pytest.raises(ValueError):
            parse_stream_read(bad, "1-5", 10)


def test_the_store_lists_its_own_changes_and_applies_others(tmp_path):
    st = SuppressionList(tmp_path / "s.sqlite", KEY)
    start = (st.generation() + 1, b"", "")
    st.add("a@example.com", "global", "hard_bounce")
    st.import_lines([f"u{i}@example.com" for i in range(5)])
    st.remove("a@example.com")
    changes = st.changes_since(start, 100)
    # (a@'s row is gone: its removal stands for it)
    assert [c.removal for c in changes] == [False] * 5 + [True]
    assert changes[0].reason == "import" and changes[-1].hash == address_hash(KEY, "a@example.com")
    # read in parts: a generation (the import) split across calls, nothing twice
    seen, pos = [], start
    while part := st.changes_since(pos, 2):
        seen += part
        pos = part[-1].position
    assert seen == changes
    # other nodes' changes: applied with the cursor, never listed as this host's own
    theirs = address_hash(KEY, "theirs@example.com")
    _, added = st.apply_shared([Change(0, theirs, "global", reason="complaint",
                                         created=1, expires=int(time.time()) + 60,
                                         source="shared by node n2")], ("stream", "7-0"))
    assert added == [theirs] and st.cursor("stream") == "7-0"
    assert st.changes_since(pos, 100) == []
    assert st.check("theirs@example.com").source == "shared by node n2"
    # a longer suppression wins, a shorter one does not replace it
    st.apply_shared([Change(0, theirs, "global", reason="manual", created=2, expires=None)],
                    ("stream", "8-0"))
    st.apply_shared([Change(0, theirs, "global", reason="complaint", created=3,
                            expires=int(time.time()) + 5)], ("stream", "9-0"))
    e = st.check("theirs@example.com")
    assert (e.reason, e.expires) == ("manual", None) and st.cursor("stream") == "9-0"
    st.apply_shared([Change(0, theirs, None, removal=True)], ("stream", "10-0"))
    assert st.check("theirs@example.com") is None
    # published: the removals and applied generations below the position are dropped
    st.set_cursor("published", "x", forget_before=st.generation() + 1)
    assert st._db.execute("SELECT count(*) FROM removed").fetchone()[0] == 0
    st.close()


# -- two nodes, one redis-server ----------------------------------------------------------

class _Node:
    """One node's store, writer thread, read connection, Redis client and sync."""

    def __init__(self, path, name: str, url: str, key: bytes = KEY, length: int = 10_000) -> None:
        from mta.egress.shared.redis_store import RedisLimits
        self.path, self.name, self.url, self.key = path, name, url, key
        self.reader = SuppressionList(path, key)
        loop = asyncio.get_running_loop()
        self.writer = SuppressionWriter(
            path, key, refresh_interval=0.2,
            on_commit=lambda t, seq, hashes: loop.call_soon_threadsafe(
                self.reader.learn, seq, hashes))
        self.writer.start()
        self.reader.refresh_elsewhere()
        self.limits = RedisLimits(url, prefix="t:", lease_ttl=3, timeout=0.5,
                                  member=f"{name}/w0")
        self.limits.start(loop)
        self.sync = SuppressionSync(self.limits.stream("suppression", length), self.writer,
                                    self.reader, key, name, poll=0.1)
        self.sync.start(loop)

    async def close(self) -> None:
        await self.sync.close()
        await self.limits.close()
        self.writer.close()
        self.reader.close()


async def _until(check, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


def _has(node: _Node, address: str) -> bool:
    with SuppressionList(node.path, node.key, private=False) as s:
        return s.check(address) is not None


def _two_nodes(tmp_path, ip: str, scenario, length: int = 10_000) -> None:
    """Run `scenario(nodes, redis)` with nodes "a" and "b" ready on a redis-server of its
    own at `ip` (a scenario may replace a node: whatever is in `nodes` is closed after)."""
    from cluster_rig import RedisServer
    if not RedisServer.available():
        from conftest import missing_tool
        missing_tool("redis-server (apt install redis-server)")
    redis = RedisServer(tmp_path / "redis", ip).start()

    async def main() -> None:
        nodes = {x: _Node(tmp_path / f"{x}.sqlite", f"n{x}", redis.url, length=length)
                 for x in "ab"}
        try:
            await _until(lambda: all(n.sync.ready for n in nodes.values()))
            await scenario(nodes, redis)
        finally:
            for n in nodes.values():
                await n.close()

    try:
        asyncio.run(main())
    finally:
        redis.stop()


def test_two_nodes_share_entries_through_redis(tmp_path):
    async def scenario(nodes: dict[str, _Node], redis) -> None:
        a, b = nodes["a"], nodes["b"]
        # a hard bounce on A (through its writer thread) reaches B's store and filter
        a.writer.submit(("gone@example.com", "global", "hard_bounce", None, "550 5.1.1"))
        await _until(lambda: b.reader.check("gone@example.com") is not None)
        assert b.reader.check("gone@example.com").reason == "hard_bounce"
        # an operator's add and removal on A (another process: the CLI)
        with SuppressionList(a.path, KEY, private=False) as cli:
            cli.add("op@example.com", "tenant:t1", "manual")
        await _until(lambda: b.reader.check("op@example.com", tenant="t1") is not None)
        with SuppressionList(a.path, KEY, private=False) as cli:
            cli.remove("gone@example.com")
        await _until(lambda: not _has(b, "gone@example.com"))
        # no echo: B published nothing, A applied nothing
        await asyncio.sleep(0.5)
        assert b.sync.stats.published == 0 and a.sync.stats.imported == 0
        assert a.sync.stats.published == 3 and b.sync.stats.imported == 3
        # B away; A goes on; B restarted resumes from its cursor
        await b.close()
        a.writer.submit(("later@example.com", "global", "complaint", None, ""))
        await _until(lambda: a.sync.stats.published == 4)
        b = nodes["b"] = _Node(tmp_path / "b.sqlite", "nb", redis.url)
        await _until(lambda: _has(b, "later@example.com"))
        await asyncio.sleep(0.3)
        assert b.sync.stats.imported == 1            # only what it had not read
        # redis-server down: A commits; back: the entry arrives
        redis.stop()
        a.writer.submit(("offline@example.com", "global", "hard_bounce", None, ""))
        await _until(lambda: a.limits.down)
        await asyncio.sleep(0.5)
        assert not _has(b, "offline@example.com")
        redis.start()
        await _until(lambda: _has(b, "offline@example.com"), 15)
        # junk in the stream: skipped and counted, the reader goes on
        raw = b.limits.client
        await raw.xadd("t:suppression", {"v": "1", "k": key_id(OTHER_KEY), "op": "add"})
        await raw.xadd("t:suppression", {"v": "1", "op": "add", "x": "y" * 5000})
        await raw.xadd("t:suppression", {"junk": "yes"})
        await raw.xadd("t:suppression", {"v": "1", "k": KID, "n": "é"})   # not ASCII
        a.writer.submit(("after-junk@example.com", "global", "hard_bounce", None, ""))
        await _until(lambda: _has(b, "after-junk@example.com"))
        assert b.sync.stats.foreign_key == 1 and b.sync.stats.malformed == 3
        assert b.sync.stats.lag < 5

    _two_nodes(tmp_path, "127.0.121.201", scenario)


def test_a_node_away_past_the_stream_length_is_told_and_goes_on(tmp_path, caplog):
    """The stream keeps about 10 records (100: Redis trims whole nodes); B is away while A
    publishes 300: B warns once that records past its cursor are gone, applies what is
    left and goes on."""
    async def scenario(nodes: dict[str, _Node], redis) -> None:
        a, b = nodes["a"], nodes["b"]
        a.writer.submit(("first@example.com", "global", "hard_bounce", None, ""))
        await _until(lambda: _has(b, "first@example.com"))
        await b.close()
        a.writer.call(lambda st: st.import_lines(f"u{i}@example.com" for i in range(300)))
        await _until(lambda: a.sync.stats.published == 301)
        b = nodes["b"] = _Node(tmp_path / "b.sqlite", "nb", redis.url, length=10)
        await _until(lambda: b.sync.stats.imported > 0)
        await asyncio.sleep(0.5)
        assert 0 < b.sync.stats.imported < 300
        # once per node: B, and A too when it read its own records back after the trim
        trimmed = [r for r in caplog.records if "are gone" in r.getMessage()]
        assert 1 <= len(trimmed) <= 2
        a.writer.submit(("later@example.com", "global", "hard_bounce", None, ""))
        await _until(lambda: _has(b, "later@example.com"))
        assert len([r for r in caplog.records if "are gone" in r.getMessage()]) \
            == len(trimmed)

    _two_nodes(tmp_path, "127.0.121.202", scenario, length=10)
