"""Envelope and Recipient (mta/model/envelope.py): the spool's envelope JSON, as
written before the typed values and as written now, and what is refused."""
from __future__ import annotations

import asyncio
import shutil

import orjson
import pytest

from conftest import ROOT
from mta.model.envelope import Envelope, EnvelopeError, Recipient
from mta.spool import Spool
from mta.spool import records as rec
from mta.spool.recovery import scan, segment_path

# A v2 segment written by the code before Envelope existed (commit d620acb; how it was
# made: tests/data/spool-v2-dict-envelopes/README.md): three messages over SMTP, one
# injected, and a RCPTS_DONE for the first message's recipient 0.
OLD = ROOT / "tests" / "data" / "spool-v2-dict-envelopes" / "00000001.seg"


def _full() -> Envelope:
    return Envelope("01a233e2dfcead5eb6320000002a76d9", "alice@sender.test",
                    [Recipient("one@example.test", "SUCCESS,FAILURE", "rfc822;One@Example.test"),
                     Recipient("zü@example.test")],
                    "client.example", "127.0.0.1", 2525, "mx", "UTF8SMTP", 1796166836.25, 288,
                    body="8BITMIME", smtputf8=True, ret="HDRS", envid="QQ+2B314",
                    tenant="acme", campaign="spring", queue_class="transactional",
                    headers={"X-Kind": "receipt"})


def _old_envelopes(directory) -> list[tuple[bytes, bytes]]:
    """(id, envelope bytes as stored) of every MESSAGE record in the old segment."""
    buf = OLD.read_bytes()
    found = scan(str(directory))
    out = []
    for msg_id, loc in sorted(found.messages.items(), key=lambda kv: kv[1].offset):
        _, env, _ = rec.parse_message(buf, loc.offset, loc.length)
        out.append((msg_id, bytes(env)))
    return out


@pytest.fixture
def old_spool(tmp_path):
    shutil.copyfile(OLD, segment_path(str(tmp_path), 1))
    return tmp_path


def test_round_trip():
    env = _full()
    data = env.to_json()
    assert Envelope.from_json(data) == env, "got a different envelope back, want the same"
    assert data == orjson.dumps(orjson.loads(data)), "want compact JSON"
    minimal = Envelope("x", "", [Recipient("a@b")], "h", "::1", 0, "inject", "local", 1.0, 10)
    assert Envelope.from_json(minimal.to_json()) == minimal


def test_old_segment_recovers_with_every_field(old_spool):
    found = scan(str(old_spool))
    assert not found.corrupt and not found.torn, f"got {found.corrupt} {found.torn}, want a clean scan"
    envs = sorted(found.envelopes.values(), key=lambda e: e.id)
    assert [type(e) for e in envs] == [Envelope] * 4
    first, plain, utf8, injected = envs
    assert first.recipients == [
        Recipient("one@example.test", "SUCCESS,FAILURE", "rfc822;Reject-Two@Example.test"),
        Recipient("reject-two@example.test", "SUCCESS,FAILURE", "rfc822;Reject-Two@Example.test")]
    got = (first.sender, first.body, first.ret, first.envid, first.tenant, first.campaign,
           first.queue_class, first.headers, first.protocol, first.helo)
    want = ("alice@sender.test", "8BITMIME", "HDRS", "QQ+2B314", "acme", "spring",
            "transactional", {"X-Kind": "receipt"}, "ESMTP", "client.old.example")
    assert got == want, f"got {got}, want {want}"
    assert found.done_rcpts[bytes.fromhex(first.id)] == {0}
    assert (plain.sender, plain.body, plain.ret, plain.envid, plain.tenant, plain.headers) == \
        ("", "", None, None, None, None)
    assert (utf8.sender, utf8.smtputf8, utf8.recipients[0].address) == \
        ("jörg@sender.test", True, "zü@example.test")
    # injected before: no body/smtputf8/ret/envid keys at all; read with their defaults
    assert (injected.listener, injected.protocol, injected.client_port, injected.body,
            injected.smtputf8, injected.ret, injected.envid) == ("inject", "local", 0, "", False, None, None)
    assert [r.address for r in injected.recipients] == ["x@example.test", "y@implicit.test"]


def test_smtp_envelopes_are_written_byte_for_byte_as_before(old_spool):
    for _, data in _old_envelopes(old_spool):
        env = Envelope.from_json(data)
        if env.protocol == "local":   # the old inject wrote no MAIL parameters; now their defaults
            assert Envelope.from_json(env.to_json()) == env
            assert len(env.to_json()) - len(data) < 60, "the added defaults stay small"
        else:
            assert env.to_json() == data, f"got {env.to_json()!r}, want {data!r}"


def test_old_segment_reads_through_the_spool(old_spool):
    async def main():
        spool = Spool(str(old_spool))
        found = spool.open(asyncio.get_running_loop())
        try:
            for msg_id in found.messages:
                env, content = spool.read(msg_id)
                assert env == found.envelopes[msg_id]
                assert len(content) == env.size, f"got {len(content)} bytes, want size {env.size}"
        finally:
            await spool.close()
    asyncio.run(main())


@pytest.mark.parametrize("data,want", [
    (b"{not json", "not JSON"),
    (b"[1,2]", "malformed"),
    (orjson.dumps({"id": "x", "sender": ""}), "no 'rcpts'"),
    (orjson.dumps({**orjson.loads(_full().to_json()), "rcpts": [["a", None, None, "extra"]]}), "malformed"),
])
def test_not_an_envelope_is_refused(data, want):
    with pytest.raises(EnvelopeError, match=want):
        Envelope.from_json(data)


def test_unknown_keys_are_ignored():
    """A key from a newer version (read after a downgrade) is not a reason to quarantine
    accepted mail; the record on disk keeps it (envelopes are never rewritten)."""
    data = orjson.dumps({**orjson.loads(_full().to_json()), "priority": 3})
    assert Envelope.from_json(data) == _full()


def test_recipient_domain():
    assert Recipient("Bob@Example.TEST").domain == "example.test"
    assert Recipient("Postmaster").domain == "postmaster", "as the scheduler always queued it"
