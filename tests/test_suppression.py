"""mta.feedback.suppression: normalisation, key file, the SQLite store (no raw addresses on disk),
scopes and expiry, the in-memory filter staying in step with other writers, and the
`suppress` CLI run as a separate process against the same store."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import orjson
import pytest

from conftest import ROOT
from mta.feedback.suppression import (KeyFileError, SuppressionList, address_hash, hash_text,
                             load_key, load_or_create_key, normalise)
from mta.feedback.suppression.cli import parse_expires

KEY = bytes(range(32))


@pytest.fixture
def store(tmp_path):
    s = SuppressionList(tmp_path / "supp.sqlite", KEY)
    yield s
    s.close()


@pytest.mark.parametrize("raw, want", [
    ("user@example.com", "user@example.com"),
    ("  <User@Example.COM>  ", "user@example.com"),
    ("John.Doe+News@EXAMPLE.com", "john.doe+news@example.com"),          # +tag kept
    ("a@Bücher.Example", "a@xn--bcher-kva.example"),                     # IDNA A-label
    ("a@XN--BCHER-KVA.example", "a@xn--bcher-kva.example"),
    ("ÜSER@example.com", "üser@example.com"),                            # UTF-8 local part
    ("a@exa_mple\u2620\u0301.com.", "a@exa_mple\u2620\u0301.com"),       # IDNA refuses: as is
    ('"Quoted@Local"@Example.com', '"quoted@local"@example.com'),        # last @ splits
])
def test_normalise(raw, want):
    got = normalise(raw)
    assert got == want, f"normalise({raw!r}): got {got!r}, want {want!r}"


@pytest.mark.parametrize("bad", ["", "   ", "<>", "nobody", "@example.com", "user@", "user@ "])
def test_normalise_rejects(bad):
    with pytest.raises(ValueError):
        normalise(bad)


def test_hash_is_keyed_and_case_insensitive():
    h = address_hash(KEY, "User@Example.com")
    assert h == address_hash(KEY, "<user@EXAMPLE.COM>")
    assert h != address_hash(bytes(32), "user@example.com"), "got the same hash for another key"
    assert h != address_hash(KEY, "user+x@example.com"), "+tags must not be stripped"
    assert len(h) == 32


def test_key_file_created_0600_and_reused(tmp_path):
    p = tmp_path / "sub" / "supp.key"
    k1 = load_or_create_key(p)
    assert len(k1) == 32
    mode = p.stat().st_mode & 0o777
    assert mode == 0o600, f"got mode {oct(mode)}, want 0o600"
    assert load_or_create_key(p) == k1, "got a new key, want the existing one kept"
    assert load_key(p) == k1
    assert [x.name for x in p.parent.iterdir()] == ["supp.key"], "temporary file left behind"


def test_key_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "short.key"
    bad.write_bytes(b"x" * 31)
    with pytest.raises(KeyFileError, match="short.key.*31 bytes"):
        load_or_create_key(bad)
    with pytest.raises(KeyFileError, match="missing.key"):
        load_key(tmp_path / "missing.key")
    d = tmp_path / "adir.key"
    d.mkdir()
    with pytest.raises(KeyFileError, match="adir.key"):
        load_or_create_key(d)
    with pytest.raises(KeyFileError):
        SuppressionList(tmp_path / "s.sqlite", b"short")


def test_add_check_remove(store):
    e = store.add("Bob@Example.com", reason="hard_bounce", note="5.1.1 user unknown")
    assert e.hash == hash_text(address_hash(KEY, "bob@example.com"))
    assert (e.scope, e.reason, e.source, e.expires) == ("global", "hard_bounce", "5.1.1 user unknown", None)
    assert abs(e.created - time.time()) < 5
    got = store.check("<BOB@example.COM>")
    assert got == e, f"got {got}, want {e}"
    assert store.check("alice@example.com") is None
    assert store.count() == 1
    assert store.remove("bob@example.com") == 1
    assert store.check("bob@example.com") is None
    assert store.remove("bob@example.com") == 0


def test_scopes(store):
    store.add("t@example.com", scope="tenant:acme", reason="unsubscribe")
    store.add("d@example.com", scope="domain:News.Example", reason="complaint", note="abuse")
    cases = [  # (address, tenant, sender_domain, want scope or None)
        ("t@example.com", None, None, None),
        ("t@example.com", "acme", None, "tenant:acme"),
        ("t@example.com", "other", None, None),
        ("d@example.com", None, "news.example", "domain:news.example"),
        ("d@example.com", "acme", "NEWS.EXAMPLE", "domain:news.example"),
        ("d@example.com", None, "other.example", None),
    ]
    for address, tenant, sender, want in cases:
        e = store.check(address, tenant=tenant, sender_domain=sender)
        got = e.scope if e else None
        assert got == want, f"check({address}, {tenant}, {sender}): got {got}, want {want}"
    # global wins when several scopes match
    store.add("t@example.com", scope="global", reason="manual")
    assert store.check("t@example.com", tenant="acme").scope == "global"
    # removing one scope leaves the others
    assert store.remove("t@example.com", scope="global") == 1
    assert store.check("t@example.com", tenant="acme").scope == "tenant:acme"
    assert store.remove("t@example.com") == 1
    assert store.check("t@example.com", tenant="acme") is None


@pytest.mark.parametrize("scope", ["", "tenant", "tenant:", "user:x", "global ", "tenant:a b"])
def test_bad_scope_rejected(store, scope):
    with pytest.raises(ValueError, match="bad scope"):
        store.add("x@example.com", scope=scope)


def test_expiry_and_purge(store):
    now = int(time.time())
    store.add("old@example.com", expires=now - 1)
    store.add("soon@example.com", expires=now + 3600)
    store.add("forever@example.com")
    assert store.check("old@example.com") is None, "got an expired entry, want it ignored"
    assert store.check("soon@example.com").expires == now + 3600
    assert store.count() == 3
    assert store.purge_expired() == 1
    assert store.count() == 2
    assert store.purge_expired(now=now + 7200) == 1
    assert [e.reason for e in store.export()] == ["manual"]


def test_expires_parse():
    now = 1_000_000
    for text, want in [("30d", now + 30 * 86400), ("12h", now + 43200), ("90m", now + 5400),
                       ("2w", now + 14 * 86400), ("1700000000", 1700000000), ("never", None),
                       (None, None)]:
        assert parse_expires(text, now) == want, f"{text}: got {parse_expires(text, now)}, want {want}"
    for bad in ("0d", "30x", "-5d", "soon"):
        with pytest.raises(ValueError):
            parse_expires(bad, now)


def test_source_text_redacts_addresses(store):
    e = store.add("x@example.com", reason="hard_bounce",
                  note="550 5.1.1 <x@example.com>: Recipient address rejected (x@example.com)")
    assert "@" not in e.source and "x@example.com" not in e.source, f"got source {e.source!r}"
    assert e.source.startswith("550 5.1.1")


def test_no_raw_address_on_disk(tmp_path):
    path = tmp_path / "supp.sqlite"
    addresses = ["Secret.Person@Example.com", "another.one+tag@mail.example.org"]
    s = SuppressionList(path, KEY)
    for a in addresses:
        s.add(a, scope="tenant:acme", reason="complaint", note=f"feedback for {a}")
    s.import_lines(["imported.person@example.net", "bad line", "#comment"], scope="global")

    def files() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("supp"))

    wal = tmp_path / "supp.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 0, "want the WAL in use while open"
    needles = []
    for a in addresses + ["imported.person@example.net"]:
        local, _, domain = a.partition("@")
        needles += [a, a.lower(), local.lower(), local]
    for when in ("open (WAL)", "closed (checkpointed)"):
        data = files()
        assert data, "got no store files"
        for n in needles:
            for form in (n.encode(), n.encode("utf-16-le")):
                assert form not in data, f"{when}: found {n!r} in the store files"
        s.close()
    # and the hashes are there
    with sqlite3.connect(path) as db:
        hashes = {row[0] for row in db.execute("SELECT hash FROM suppression")}
    assert address_hash(KEY, addresses[0]) in hashes


def test_export_import_round_trip(tmp_path, store):
    now = int(time.time())
    store.add("a@example.com", scope="tenant:acme", reason="unsubscribe", note="rfc8058")
    store.add("b@example.com", scope="domain:news.example", reason="complaint", expires=now + 99)
    exported = [orjson.dumps(e.to_dict()).decode() for e in store.export()]
    assert all("example.com" not in line for line in exported), "got an address in the export"
    other = SuppressionList(tmp_path / "copy.sqlite", KEY)
    counts = other.import_lines(exported + [e.split('"')[3] for e in exported] + ["nonsense", ""],
                                scope="global", reason="import")
    assert counts == {"addresses": 0, "hashes": 2, "entries": 2, "invalid": 1}, f"got {counts}"
    assert {e for e in other.export() if e.scope != "global"} == set(store.export())
    assert other.check("a@example.com").scope == "global"        # the bare hash line
    assert other.check("b@example.com", sender_domain="news.example").scope == "global"  # global wins
    assert other.remove("b@example.com", scope="global") == 1
    assert other.check("b@example.com", sender_domain="news.example").expires == now + 99
    assert other.check("a@example.com", tenant="acme") is not None
    other.close()


def test_import_addresses_one_transaction(store):
    lines = [f"user{i}@Example.com" for i in range(5000)] + ["", "# comment", "broken"]
    counts = store.import_lines(lines, scope="tenant:bulk", reason="import", expires=None)
    assert counts == {"addresses": 5000, "hashes": 0, "entries": 0, "invalid": 1}
    assert store.count() == 5000
    assert store.check("USER4999@example.com", tenant="bulk").reason == "import"
    assert store.check("user5000@example.com", tenant="bulk") is None


def test_filter_sees_other_writers(tmp_path):
    """The daemon's instance sees entries another process adds (the CLI) after a refresh,
    and never trusts a stale filter entry after a removal elsewhere."""
    path = tmp_path / "s.sqlite"
    daemon = SuppressionList(path, KEY, refresh_interval=0.0)
    cli = SuppressionList(path, KEY)
    assert daemon.check("late@example.com") is None
    cli.add("late@example.com")
    assert daemon.check("late@example.com") is not None, "got a miss after another writer added"
    cli.remove("late@example.com")
    assert daemon.check("late@example.com") is None, "got a hit after another writer removed"
    # bulk: more than one filter merge worth of additions from elsewhere
    cli.import_lines(f"bulk{i}@example.com" for i in range(10_000))
    assert all(daemon.check(f"bulk{i}@example.com") for i in range(0, 10_000, 97))
    assert daemon.check("bulk10000@example.com") is None
    # our own additions are visible at once, even with a long refresh interval
    slow = SuppressionList(path, KEY, refresh_interval=3600)
    slow.add("mine@example.com")
    assert slow.check("mine@example.com") is not None
    for s in (daemon, cli, slow):
        s.close()


def test_filter_merges_many_own_additions(store):
    store.import_lines(f"m{i}@example.com" for i in range(3000))
    for i in range(3000, 9000):          # one by one: several merges of the recent set
        if i % 1000 == 0:
            store.add(f"m{i}@example.com")
    store.import_lines(f"m{i}@example.com" for i in range(9000, 14000))
    assert len(store._filter) + len(store._recent) >= 8000
    missing = [i for i in range(0, 14000, 7) if (i < 3000 or i >= 9000 or i % 1000 == 0)
               and store.check(f"m{i}@example.com") is None]
    assert not missing, f"got misses for {missing[:5]}"


def test_concurrent_writers_wait_instead_of_failing(tmp_path):
    path = tmp_path / "s.sqlite"
    a = SuppressionList(path, KEY, busy_timeout=5)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")       # another process holds the write lock ...
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r});"
              "from mta.feedback.suppression import SuppressionList;"
              f"s = SuppressionList({str(path)!r}, bytes(range(32)), busy_timeout=10);"
              "s.add('waiter@example.com'); print('ok')")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert proc.poll() is None, "got the writer finished while the lock was held"
    assert a.check("someone@example.com") is None     # WAL: reads go on meanwhile
    holder.execute("COMMIT")                  # ... and lets go
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and out.strip() == "ok", f"got rc {proc.returncode} {out!r}"
    a.refresh()
    assert a.check("waiter@example.com") is not None
    holder.close()
    a.close()


# --- the CLI as the operator runs it ---------------------------------------------------

def cli(tmp_path, *args, stdin=None):
    cmd = [sys.executable, "-c",
           "import sys; from mta.feedback.suppression.cli import main; sys.exit(main(sys.argv[1:]))",
           *args, "--store", str(tmp_path / "s.sqlite"), "--key", str(tmp_path / "s.key")]
    return subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    r = cli(tmp_path, "check", "x@y.com")
    assert r.returncode == 2 and "s.key" in r.stderr, f"got {r.returncode} {r.stderr!r}"
    r = cli(tmp_path, "add", "X@Y.com", "--scope", "tenant:acme", "--reason", "manual",
            "--expires", "30d")
    assert r.returncode == 0, r.stderr
    added = orjson.loads(r.stdout)
    assert "x@y.com" not in r.stdout.lower()
    assert added["scope"] == "tenant:acme" and abs(added["expires"] - time.time() - 30 * 86400) < 60
    assert (tmp_path / "s.key").stat().st_mode & 0o777 == 0o600

    r = cli(tmp_path, "check", "x@y.com")
    assert r.returncode == 1, f"got {r.returncode}, want 1 (not suppressed globally)"
    r = cli(tmp_path, "check", "x@Y.COM", "--tenant", "acme")
    assert r.returncode == 0 and orjson.loads(r.stdout)["hash"] == added["hash"]

    # the daemon's open instance sees the CLI's change
    daemon = SuppressionList(tmp_path / "s.sqlite", load_key(tmp_path / "s.key"),
                             refresh_interval=0)
    r = cli(tmp_path, "import", "-", "--scope", "global", "--reason", "import",
            stdin="a@example.com\nhmac-sha256:" + "ab" * 32 + "\nnot an address\n\n")
    assert r.returncode == 0, r.stderr
    assert "imported 1 addresses, 1 hashes" in r.stdout and "1 invalid" in r.stdout, r.stdout
    assert daemon.check("A@example.com").reason == "import"
    daemon.close()

    f = tmp_path / "list.txt"
    f.write_text("b@example.com\nc@example.com\n")
    r = cli(tmp_path, "import", str(f), "--expires", "1")     # unix time 1: already expired
    assert r.returncode == 0 and "imported 2 addresses" in r.stdout

    r = cli(tmp_path, "export")
    lines = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and len(lines) == 5, r.stdout
    assert "example.com" not in r.stdout and "y.com" not in r.stdout
    assert all(x["hash"].startswith("hmac-sha256:") for x in lines)
    r = cli(tmp_path, "export", "--scope", "tenant:acme")
    assert [orjson.loads(x)["hash"] for x in r.stdout.splitlines()] == [added["hash"]]

    r = cli(tmp_path, "purge")
    assert r.returncode == 0 and "purged 2 expired entries; 3 left" in r.stdout, r.stdout
    r = cli(tmp_path, "remove", "x@y.com")
    assert r.returncode == 0 and "removed 1 entry" in r.stdout
    r = cli(tmp_path, "check", "x@y.com", "--tenant", "acme")
    assert r.returncode == 1

    r = cli(tmp_path, "add", "x@y.com", "--scope", "bogus")
    assert r.returncode == 2 and "bad scope" in r.stderr
    r = cli(tmp_path, "add", "x@y.com", "--expires", "soon")
    assert r.returncode == 2 and "bad expiry" in r.stderr
    assert "x@y.com" not in r.stderr


def test_cli_registers_under_mta_parser(tmp_path):
    import argparse
    from mta.feedback.suppression.cli import add_parser
    p = argparse.ArgumentParser(prog="mta")
    add_parser(p.add_subparsers(dest="command"), str(tmp_path / "d.sqlite"), str(tmp_path / "d.key"))
    args = p.parse_args(["suppress", "add", "z@example.com", "--reason", "complaint"])
    assert args.store == str(tmp_path / "d.sqlite")
    assert args.func(args) == 0
    args = p.parse_args(["suppress", "check", "z@example.com"])
    assert args.func(args) == 0
    assert os.path.exists(tmp_path / "d.key")


@pytest.mark.parametrize("key_len", [1, 32, 64, 65, 200])
def test_address_hash_is_rfc2104_hmac_sha256(key_len):
    import hmac
    from mta.feedback.suppression.store import address_hash, normalise
    key = bytes(range(key_len % 256)) * (key_len // 256 + 1)
    key = key[:key_len]
    for address in ("User@Example.ORG", "<a+tag@b.test>", "j\u00f6rg@m\u00fcnchen.example"):
        want = hmac.digest(key, normalise(address).encode("utf-8", "surrogatepass"), "sha256")
        assert address_hash(key, address) == want, address
