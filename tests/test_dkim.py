"""DKIM signer (mta/dkim/signer.py over native/dkim/): vectors, round trips, batches, keys.

The verifier is dkimpy (independent Python implementation); DNS is a dict.
Vectors come from tests/data/dkim-vectors (README.md there):
- canonicalization.tsv: every row through the native canonicaliser;
- every stored signature: our bh= equals the signer's, the stored b= verifies
  (with the published public key) over our header-hash input, and where the
  private key is public (RFC 6376 App. C, RFC 8463 A.1/A.2) our b= is the
  same bit for bit (RSA PKCS#1 v1.5 and Ed25519 are deterministic);
- expectations.tsv: every row is mapped to a check below (EXPECTATIONS);
  negative rows are applied to the stored message and to our own signatures.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import shutil
import subprocess
import threading

import dkim
import pytest
from conftest import corpus
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mta.dkim.signer as signer_mod
from mta._native import dkim as native
from mta._native import wire
from mta.dkim.signer import (
    OVERSIGN,
    PERMANENT,
    DkimConfigError,
    DkimError,
    Signer,
    SignSpec,
    dns_record,
    keygen,
    load_key,
)

VEC = corpus("dkim-vectors")


def _tsv(name: str) -> list[list[str]]:
    lines = (VEC / name).read_text().splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


DNS = {row[0]: row[1] for row in _tsv("dns-records.tsv")}


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def read_msg(rel: str) -> bytes:
    data = (VEC / rel).read_bytes()
    return crlf(data) if rel.startswith("dkimpy/") else data   # dkimpy files are LF


def resolver(records: dict[str, str]):
    def dnsfunc(name, timeout=5):
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value is not None else None
    return dnsfunc


def verifies(message: bytes, records: dict[str, str], idx: int = 0) -> bool:
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=resolver(records)))
    except dkim.DKIMException:   # dkim.verify() does the same: a failure, not an error
        return False


def sig_fields(message: bytes) -> list[bytes]:
    """The raw DKIM-Signature fields (folded, no final CRLF), top to bottom."""
    head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    fields = re.findall(rb"^[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", head, re.MULTILINE)
    return [f[:-2] for f in fields if f[:15].lower() == b"dkim-signature:"]


def tags(field: bytes) -> dict[bytes, bytes]:
    value = re.sub(rb"\r\n[ \t]", b" ", field.split(b":", 1)[1])
    out = {}
    for item in value.split(b";"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.strip()] = re.sub(rb"\s+", b"", v) if k.strip() in (b"b", b"bh") else v.strip()
    return out


def emptied(field: bytes) -> bytes:
    """The field as it is hashed: b= value removed (RFC 6376 3.7)."""
    return re.sub(rb"([:;])(\s*b\s*=)[^;]*", rb"\1\2", field)


# ---- canonicalisation vectors ----------------------------------------------------------

def _unescape(s: str) -> bytes:
    return s.replace("\\r", "\r").replace("\\n", "\n").replace("\\t", "\t").encode()


def _canon_cases():
    for i, (alg, part, inp, want, note, *_) in enumerate(_tsv("canonicalization.tsv")):
        inp = re.sub(r" \((two writes|name,value pairs)[^)]*\)$", "", inp)
        chunks = [_unescape(c.strip('"')) for c in inp.split(" + ")]   # chunked writes, joined
        yield pytest.param(alg, part, chunks, want, id=f"{i + 2}-{alg}-{part}-{note[:40]}")


@pytest.mark.parametrize("alg,part,chunks,want", list(_canon_cases()))
def test_canonicalization_vector(alg, part, chunks, want):
    relaxed = alg == "relaxed"
    if part == "body":
        got = native.canon_body(b"".join(chunks), relaxed)
    else:   # each chunk is one or more whole fields
        fields = [f for c in chunks for f in re.findall(rb"[^ \t][^\n]*\n(?:[ \t][^\n]*\n)*", c)]
        got = b"".join(native.canon_field(f, relaxed) for f in fields)
    expect = b"".join(chunks) if want == "unchanged" else _unescape(want)
    assert got == expect, f"got {got!r}, want {expect!r}"


# ---- stored signatures -------------------------------------------------------------------

SEED = "go-msgauth/rfc8463-ed25519-private-seed.b64"
APPC = "go-msgauth/rfc6376-appC-private-key.pem"
# (vector, message file, signature index, private key file or None)
STORED = [
    ("rfc6376-A3", "go-msgauth/rfc6376-A3-signed.eml", 0, APPC),
    ("rawrsa-pkcs1", "go-msgauth/rawrsa-pkcs1-key-signed.eml", 0, None),
    ("rfc8463-A3-ed25519", "go-msgauth/rfc8463-A3-signed.eml", 0, SEED),
    ("rfc8463-A3-rsa", "go-msgauth/rfc8463-A3-signed.eml", 1, "dkimpy/test.private"),
    ("library-signed-rsa", "go-msgauth/library-signed-rsa.eml", 0, APPC),
    ("library-signed-ed25519", "go-msgauth/library-signed-ed25519.eml", 0, SEED),
    ("dkimpy-draft8463-ed25519", "dkimpy/rfc6376.signed.msg", 0, "dkimpy/rfc8032_7_1.key"),
    ("dkimpy-draft8463-rsa", "dkimpy/rfc6376.signed.msg", 1, "dkimpy/test.private"),
    ("exim-ed25519", "dkimpy/ed25519test2.msg", 0, None),
    ("gmail-degenerate-folding", "dkimpy/test2.message", 0, None),
]


def _public_verify(record: str, alg: bytes, data: bytes, sig: bytes) -> None:
    raw = base64.b64decode(re.search(r"p=([^;\s]+)", record).group(1))
    if alg == b"ed25519-sha256":   # RFC 8463 3: Ed25519 over the SHA-256 digest
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(sig, hashlib.sha256(data).digest())
        return
    try:
        key = serialization.load_der_public_key(raw)
    except ValueError:   # bare PKCS#1 RSAPublicKey (rawrsa-pkcs1)
        pem = base64.encodebytes(raw).decode()
        key = serialization.load_pem_public_key(
            f"-----BEGIN RSA PUBLIC KEY-----\n{pem}-----END RSA PUBLIC KEY-----\n".encode())
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("vector,path,idx,keyfile", STORED, ids=[s[0] for s in STORED])
def test_stored_signature(vector, path, idx, keyfile):
    msg = read_msg(path)
    field = sig_fields(msg)[idx]
    t = tags(field)
    head_c, _, body_c = t.get(b"c", b"simple/simple").partition(b"/")
    record = DNS[f"{t[b's'].decode()}._domainkey.{t[b'd'].decode()}"]
    assert verifies(msg, DNS, idx), "dkimpy must accept the stored vector"
    got_bh = base64.b64encode(native.body_hash(msg, body_c == b"relaxed"))
    assert got_bh == t[b"bh"], f"bh: got {got_bh!r}, want {t[b'bh']!r}"
    names = [n.strip() for n in t[b"h"].split(b":")]
    data = native.header_input(msg, head_c == b"relaxed", names, emptied(field))
    _public_verify(record, t[b"a"], data, base64.b64decode(t[b"b"]))   # our header hash input
    if keyfile:
        key = load_key(str(VEC / keyfile), t[b"d"].decode(), t[b"s"].decode())
        got = native.sign_prepared(key.key, msg, head_c == b"relaxed", names, emptied(field))
        assert base64.b64encode(got) == t[b"b"], "b= must be reproduced bit for bit"


# ---- expectations.tsv --------------------------------------------------------------------

FOOTBALL_ED = ("brisbane", "football.example.com", SEED)
FOOTBALL_RSA = ("test", "football.example.com", "dkimpy/test.private")
CANONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")


def _key(sel, domain, path):
    return load_key(str(VEC / path), domain, sel)


@pytest.fixture(scope="module")
def signer():
    with Signer(threads=4) as s:
        yield s


@pytest.fixture(scope="module")
def a3_signed(signer):
    """The RFC 8463 A.3 message re-signed by us: [relaxed ed25519, relaxed rsa, simple rsa]."""
    base = read_msg("go-msgauth/rfc8463-A3-signed.eml")
    base = base[base.index(b"From: "):]
    ed, rsa = _key(*FOOTBALL_ED), _key(*FOOTBALL_RSA)
    return signer.sign(base, [SignSpec(ed), SignSpec(rsa), SignSpec(rsa, canon="simple/simple")])


def _file(rel: str) -> str:
    return (VEC / rel).read_text().strip()


def _roundtrip(signer, path, sel, domain, keyfile, headers=None):
    key = _key(sel, domain, keyfile)
    msg = read_msg(path)
    for canon in CANONS:
        spec = SignSpec(key, canon=canon, **({"headers": headers} if headers else {}))
        assert verifies(signer.sign(msg, [spec]), DNS), canon


A8463 = "go-msgauth/rfc8463-A3-signed.eml"   # relaxed/relaxed: #0 ed25519, #1 rsa
A6376 = "go-msgauth/rfc6376-A3-signed.eml"   # simple/simple: #0 rsa
ADD_FROM = b"From: Mallory <mallory@football.example.com>\r\n"
BODY = (lambda m: m + b"foo\r\n")
SUBJECT = (lambda m: m.replace(b"ready?", b"ready!"))
EXTRA_FROM = (lambda m: ADD_FROM + m)
CRLFS = (lambda m: m + b"\r\n\r\n")
WSP_EOL = (lambda m: m.replace(b"Hi.\r\n", b"Hi. \t \r\n"))
UPPER = (lambda m: m.replace(b"Subject:", b"SUBJECT:"))
RECEIVED = (lambda m: m.replace(b".com  [192", b".com [192"))
SUBJECT_WSP = (lambda m: m.replace(b"Subject: Is", b"Subject:  Is"))
# vector -> (stored file, its signatures, mutations; our signatures (a3_signed), mutations; want)
MUTATIONS = {
    "neg-altered-body": (A8463, (0, 1), [BODY], (0, 1, 2), [BODY], False),
    "neg-altered-subject": (A8463, (0,), [SUBJECT], (0, 1, 2), [SUBJECT], False),
    "neg-extra-from": (A8463, (0,), [EXTRA_FROM], (0, 1, 2), [EXTRA_FROM], False),
    "relaxed-tolerance": (A8463, (0,), [CRLFS, WSP_EOL, UPPER], (0, 1), [CRLFS, WSP_EOL, UPPER,
                                                                          SUBJECT_WSP], True),
    "simple-strictness": (A6376, (0,), [WSP_EOL, RECEIVED], (2,), [WSP_EOL, SUBJECT_WSP], False),
    "simple-trailing-crlf": (A6376, (0,), [CRLFS], (2,), [CRLFS], True),
}
# vector -> (DNS record replaced for the RSA signature, want)
KEY_RECORDS = {"neg-badversion": ("dkimpy/badversion.txt", False),
               "neg-unknown-k": ("dkimpy/badk.txt", False),
               "neg-truncated-key": ("dkimpy/test_bad.txt", False),
               "implicit-k": ("dkimpy/test2.txt", True)}
STORED_NAMES = {s[0] for s in STORED}
SIGN_CASES = {"sign-roundtrip-rsa", "sign-roundtrip-ed25519", "sign-rfc8032-key", "no-from",
              "extra-received-headers", "rfc6376-A2-unsigned", "neg-no-key"}


def test_every_expectation_is_checked():
    rows = {row[0] for row in _tsv("expectations.tsv")}
    handled = STORED_NAMES | SIGN_CASES | set(MUTATIONS) | set(KEY_RECORDS)
    assert rows - handled == set(), f"unchecked vectors: got {sorted(rows - handled)}, want none"


@pytest.mark.parametrize("vector", sorted(MUTATIONS))
def test_mutation_vectors(vector, a3_signed):
    path, idxs, mutations, ours, our_mutations, want = MUTATIONS[vector]
    for n, mutate in enumerate(mutations):        # as stated, on the stored message
        for i in idxs:
            assert verifies(mutate(read_msg(path)), DNS, i) is want, f"stored #{i} m{n}: want {want}"
    for n, mutate in enumerate(our_mutations):    # and on our own signatures
        for i in ours:
            assert verifies(mutate(a3_signed), DNS, i) is want, f"ours #{i} m{n}: want {want}"


@pytest.mark.parametrize("vector", sorted(KEY_RECORDS))
def test_key_record_vectors(vector, a3_signed):
    path, want = KEY_RECORDS[vector]
    records = dict(DNS, **{"test._domainkey.football.example.com": _file(path)})
    assert verifies(read_msg("go-msgauth/rfc8463-A3-signed.eml"), records, 1) is want
    assert verifies(a3_signed, records, 1) is want


def test_no_key_fails(a3_signed):
    records = {k: v for k, v in DNS.items() if not k.startswith("brisbane._domainkey.football")}
    assert not verifies(a3_signed, records, 0)
    assert verifies(a3_signed, records, 1)


def test_sign_roundtrips(signer):
    _roundtrip(signer, "dkimpy/test.message", "test", "example.com", "dkimpy/test.private")
    _roundtrip(signer, "dkimpy/ed25519test.msg", "test", "example.net", "dkimpy/ed25519test.key")
    _roundtrip(signer, "dkimpy/rfc6376.msg", "brisbane", "football.example.com",
               "dkimpy/rfc8032_7_1.key")
    _roundtrip(signer, "dkimpy/message.mbox", "test", "example.com", "dkimpy/test.private",
               headers=("from", "to", "subject", "received", "date"))


def test_unsigned_vector_signs_like_the_library(signer, monkeypatch):
    msg = read_msg("go-msgauth/rfc6376-A2-unsigned.eml")
    assert sig_fields(msg) == []
    monkeypatch.setattr(signer_mod, "time", type("T", (), {"time": staticmethod(lambda: 424242)}))
    key = _key("brisbane", "example.org", APPC)
    spec = SignSpec(key, headers=("from", "to", "subject", "date", "message-id"), oversign=(),
                    canon="simple/simple")
    signed = signer.sign(msg, [spec])
    got = tags(sig_fields(signed)[0])
    want = tags(sig_fields(read_msg("go-msgauth/library-signed-rsa.eml"))[0])
    for tag in (b"bh", b"t", b"c", b"d", b"s", b"a"):   # b= differs only by the field's layout
        assert got[tag] == want[tag], f"{tag!r}: got {got[tag]!r}, want {want[tag]!r}"
    assert got[b"h"].lower() == want[b"h"].lower()
    assert verifies(signed, DNS)
    assert signer.sign(msg, [spec]) == signed, "deterministic at a fixed t="


def test_no_from_is_refused(signer):
    key = _key("test", "example.com", "dkimpy/test.private")
    with pytest.raises(DkimError) as e:
        signer.sign(read_msg("dkimpy/test_nofrom.message"), [SignSpec(key)])
    assert e.value.reason == "no-from" and e.value.permanent


# ---- generated keys, property tests ---------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Generated RSA-1024/2048/4096 and Ed25519 keys, and their DNS records."""
    d = tmp_path_factory.mktemp("keys")
    out, records = {}, {}
    for name, alg, bits in (("rsa1024", "rsa", 1024), ("rsa2048", "rsa", 2048),
                            ("rsa4096", "rsa", 4096), ("ed", "ed25519", 0)):
        pem, pub = keygen(alg, bits or 2048)
        (d / name).write_bytes(pem)
        out[name] = load_key(str(d / name), "example.com", name)
        rec = dns_record(name, "example.com", alg, pub)
        strings = re.findall(r'"([^"]*)"', rec)
        assert all(len(s) <= 255 for s in strings), rec
        records[f"{name}._domainkey.example.com"] = "".join(strings)
        assert out[name].public_b64 == pub
    return out, records


def test_key_sizes(keys, signer):
    k, records = keys
    msg = b"From: a@example.com\r\nSubject: sizes\r\n\r\nhello\r\n"
    specs = [SignSpec(k[n]) for n in ("rsa1024", "rsa2048", "rsa4096", "ed")]
    signed = signer.sign(msg, specs)
    for i in range(4):
        assert verifies(signed, records, i), specs[i].key.selector
    for field in sig_fields(signed):
        assert max(len(line) for line in field.split(b"\r\n")) <= 78


WORD = st.binary(min_size=1, max_size=10).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7e or c >= 0x80) or b"w")
SEP = st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\r\n ", b"\r\n\t", b"\n ", b"  \r\n  "])
VALUE = st.lists(st.tuples(SEP, WORD), max_size=25).map(lambda p: b"".join(s + w for s, w in p))
NAME = st.sampled_from(["To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "X-Custom",
                        "Received", "References", "List-Id", "Content-Type", "MIME-Version"])
EOL = st.sampled_from([b"\r\n", b"\n"])
CASE = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])
FIELD = st.tuples(NAME, CASE, VALUE, EOL).map(lambda t: t[1](t[0]).encode() + b":" + t[2] + t[3])
TOKEN = st.sampled_from([b"word", b" ", b"  ", b"\t", b" \t", b"\x80\xff", b"caf\xc3\xa9", b".",
                         b"x" * 90, b"\r"])
LINE = st.tuples(st.lists(TOKEN, max_size=12).map(b"".join), EOL).map(b"".join)
BODY = st.tuples(st.lists(LINE, max_size=12), st.integers(0, 3), EOL,
                 st.lists(TOKEN, max_size=3).map(b"".join)).map(
    lambda t: b"".join(t[0]) + t[2] * t[1] + t[3])


@st.composite
def messages(draw):
    fields = draw(st.lists(FIELD, max_size=8))
    fields.insert(draw(st.integers(0, len(fields))), b"From: " + draw(VALUE) + draw(EOL))
    return b"".join(fields) + draw(EOL) + draw(BODY)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages(), canon=st.sampled_from(["relaxed/relaxed", "simple/simple"]))
def test_random_messages_verify(keys, signer, msg, canon):
    k, records = keys
    signed = signer.sign(msg, [SignSpec(k["ed"], canon=canon), SignSpec(k["rsa2048"], canon=canon)])
    sent = native.repair(msg)
    assert signed.endswith(sent), "the signed message is the repaired one"
    assert wire.dot_stuff(sent) == wire.dot_stuff(msg), "repair == what the SMTP client sends"
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", signed), "CRLF only"
    assert verifies(signed, records, 0) and verifies(signed, records, 1)


# ---- batches and threads ------------------------------------------------------------------

def _batch(n=200, bad=100):
    msgs = [b"From: s%d@example.com\r\nTo: r@example.org\r\nSubject: m %d\r\n\r\nbody %d\r\n"
            % (i, i, i) * 1 for i in range(n)]
    msgs[bad] = b"From: x@example.com\r\nthis line has no colon\r\n\r\nbody\r\n"
    return msgs


def test_batch_with_one_malformed_message(keys, signer):
    k, records = keys
    specs = [SignSpec(k["ed"]), SignSpec(k["rsa2048"], expire_after=3600)]
    out = signer.sign_batch(_batch(), [specs] * 200)
    bad = [i for i, r in enumerate(out) if isinstance(r, DkimError)]
    assert bad == [100], f"got errors at {bad}, want [100]"
    assert out[100].reason == "no-colon" and "line 2" in out[100].detail
    assert all(verifies(r, records, 0) and verifies(r, records, 1) for r in out if r is not out[100])


def test_batches_from_many_threads(keys, monkeypatch):
    k, _ = keys
    monkeypatch.setattr(signer_mod, "time", type("T", (), {"time": staticmethod(lambda: 1e9)}))
    specs = [[SignSpec(k["ed"]), SignSpec(k["rsa1024"], canon="simple/simple")]] * 200
    msgs = _batch()
    with Signer(threads=1) as one:
        want = one.sign_batch(msgs, specs)   # deterministic signatures: one reference
    results, errors = [], []
    with Signer(threads=4) as shared:
        def run():
            try:
                for _ in range(3):
                    results.append(shared.sign_batch(msgs, specs))
            except Exception as e:   # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.append(asyncio.run(shared.sign_batch_async(msgs, specs)))
    assert errors == [] and len(results) == 13
    for got in results:
        assert [r if isinstance(r, bytes) else r.reason for r in got] == \
               [r if isinstance(r, bytes) else r.reason for r in want]


def test_headers_only_goes_in_front_of_the_message_as_stored(keys, signer):
    k, records = keys
    msgs = [b"From: a@example.com\nSubject: lf only\n\nbody\rline\n",
            b"From: a@example.com\r\nSubject: crlf\r\n\r\nno final crlf"]
    heads = signer.sign_batch(msgs, [[SignSpec(k["ed"])]] * 2, headers_only=True)
    for head, msg in zip(heads, msgs):
        assert head.startswith(b"DKIM-Signature: ") and head.endswith(b"\r\n")
        sent = native.repair(head + msg)   # what our SMTP client puts on the wire
        assert wire.dot_stuff(head + msg) == wire.dot_stuff(sent)
        assert verifies(sent, records)
    assert signer.sign_batch(msgs, [[], []]) == [native.repair(m) for m in msgs], "no specs"


MALFORMED = [
    ("no-separator", b"From: a@example.com\r\nSubject: x\r\n"),
    ("no-separator", b""),
    ("no-colon", b"From: a@example.com\r\nnot a field\r\n\r\nbody\r\n"),
    ("leading-fold", b" From: a@example.com\r\n\r\nbody\r\n"),
    ("bad-name", b"From: a@example.com\r\nBad Name: x\r\n\r\n"),
    ("no-from", b"To: a@example.com\r\n\r\n"),
    ("multiple-from", b"From: a@example.com\r\nFrom: b@example.com\r\n\r\n"),
    ("too-many-fields", b"From: a@example.com\r\n" + b"X: y\r\n" * 5000 + b"\r\n"),
    ("too-many-signed", b"From: a@example.com\r\n" + b"To: y\r\n" * 600 + b"\r\n"),
]


@pytest.mark.parametrize("reason,msg", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_messages(keys, signer, reason, msg):
    with pytest.raises(DkimError) as e:
        signer.sign(msg, [SignSpec(keys[0]["ed"])])
    assert e.value.reason == reason, f"got {e.value.reason}, want {reason}"
    assert e.value.permanent and e.value.scope == "message"


def test_every_native_error_is_classified():
    assert set(native.ERRORS.values()) == set(PERMANENT), "PERMANENT must name every reason"


def test_oversigning_blocks_added_fields(keys, signer):
    k, records = keys
    signed = signer.sign(b"From: a@example.com\r\nSubject: s\r\n\r\nb\r\n", [SignSpec(k["ed"])])
    h = tags(sig_fields(signed)[0])[b"h"].split(b":")
    for name in OVERSIGN:   # present once: listed twice; absent: once
        assert h.count(name.encode()) == (2 if name in ("from", "subject") else 1), name
    assert not verifies(signed.replace(b"\r\n\r\n", b"\r\nCc: x@example.net\r\n\r\n", 1), records)


# ---- keys and specs ------------------------------------------------------------------------

def _openssl(*args: str) -> bytes:
    assert shutil.which("openssl"), "openssl missing: tools/dkim-packages.txt installs it"
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


BAD_KEYS = [
    ("garbage", lambda: b"this is not a key\n", "holds no PEM private key"),
    ("public", lambda: _openssl("pkey", "-pubout", "-in", str(VEC / APPC)), "public key"),
    ("rsa512", lambda: _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512"),
     "512-bit RSA key"),
    ("encrypted", lambda: _openssl("genpkey", "-algorithm", "ED25519", "-aes128", "-pass",
                                   "pass:x"), "passphrase"),
    ("ec", lambda: _openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
                            "ec_paramgen_curve:P-256"), "neither an RSA nor an Ed25519"),
]


@pytest.mark.parametrize("name,make,text", BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
def test_bad_keys(tmp_path, name, make, text):
    path = tmp_path / f"{name}.key"
    path.write_bytes(make())
    with pytest.raises(DkimConfigError) as e:
        load_key(str(path), "example.com", "sel")
    assert str(path) in str(e.value) and text in str(e.value), f"got {e.value}, want {text!r}"


def test_key_errors_name_the_file(tmp_path):
    with pytest.raises(DkimConfigError, match="missing.pem: cannot read"):
        load_key(str(tmp_path / "missing.pem"), "example.com", "sel")
    with pytest.raises(DkimConfigError, match="is an Ed25519 key, but algorithm rsa-sha256"):
        load_key(str(VEC / SEED), "example.com", "sel", "rsa-sha256")
    key = load_key(str(VEC / APPC), "EXAMPLE.com.", "sel", "rsa")
    assert (key.domain, key.algorithm, key.bits) == ("example.com", "rsa-sha256", 1024)
    with pytest.raises(DkimConfigError, match="must include 'from'"):
        SignSpec(key, headers=("to",), oversign=())
    with pytest.raises(DkimConfigError, match="canon"):
        SignSpec(key, canon="relaxed")
