"""Returned mail about sealed recipients, without a daemon (mta/feedback/trust.py, intake.py):
the VERP return path of a sealed recipient is bound to its sealed form; a report naming
the clear address proves that sealed form (under any key of the keyring, either letter
case of the local part), never another address; what the records then say; and what a
hostile report costs. The end-to-end test is tests/scenarios/test_sealed_feedback.py."""
from __future__ import annotations

import base64
import os
import time

from test_feedback_proof import DOMAIN, _bounce, _complaint, _env

from mta.config import parse_config
from mta.feedback import verp
from mta.feedback.intake import BounceIntake
from mta.feedback.state import Feedback
from mta.feedback.trust import ENVELOPE, MAX_SEALS, TRUSTED_SOURCE, Evidence
from mta.model.sealed import Keyring

K1, K2 = bytes(range(64)), bytes(range(64, 128))


def _feedback(tmp_path, keys: dict[str, bytes], bounces: str = "") -> Feedback:
    ring = tmp_path / "ring"
    ring.write_text("".join(f"{k} {base64.b64encode(v).decode()}\n" for k, v in keys.items()))
    os.chmod(ring, 0o600)
    cfg = parse_config(f'[bounces]\ndomain = "{DOMAIN}"\n{bounces}\n[suppression]\n'
                       f'store = "{tmp_path}/s.sqlite"\nkey_file = "{tmp_path}/k"\n'
                       f'[privacy]\nkeyring = "{ring}"\n')
    return Feedback(cfg)


def _named(fb: Feedback, rcpt, verdict) -> dict:
    intake = BounceIntake.__new__(BounceIntake)     # _named needs only the feedback state
    intake.feedback = fb
    return intake._named(rcpt, verdict)


def test_sealed_return_path_proves_the_sealed_form_only(tmp_path):
    fb = _feedback(tmp_path, {"k1": K1, "k2": K2})
    sealed = Keyring({"k1": K1}).seal("alice.q@example.test")          # under the older key
    path = fb.verp_sender(os.urandom(16), 0, sealed, time.time())
    env, idxs = _env(path)
    # the remote server may write the address in another case
    for named in ("alice.q@example.test", "Alice.Q@example.test", "ALICE.Q@EXAMPLE.TEST"):
        verdict = Evidence(fb, env, idxs, _bounce(named)).prove(named)
        assert (verdict.proof, verdict.sealed is not None) == (ENVELOPE, True), named
        assert verdict.sealed.lower() == sealed.lower()
        assert _named(fb, named, verdict) == {"recipient": verdict.sealed}
    # the genuine path of a sealed recipient proves no one else (an attacker who got it)
    verdict = Evidence(fb, env, idxs, _bounce("victim@example.test")).prove("victim@example.test")
    assert (verdict.proof, verdict.ignored) == (None, verp.MISMATCH)
    shown = _named(fb, "victim@example.test", verdict)
    assert shown == {"recipient": None, "recipient_hash": fb.hash_address("victim@example.test")}
    # a clear recipient's path still proves the clear address, named in clear
    clear_path = fb.verp_sender(os.urandom(16), 0, "bob@example.test", time.time())
    env, idxs = _env(clear_path)
    verdict = Evidence(fb, env, idxs, _bounce("bob@example.test")).prove("bob@example.test")
    assert (verdict.proof, verdict.sealed) == (ENVELOPE, None)
    assert _named(fb, "bob@example.test", verdict) == {"recipient": "bob@example.test"}


def test_key_gone_expired_and_trusted_source(tmp_path):
    fb = _feedback(tmp_path, {"k2": K2}, 'trusted_fbl_sources = ["192.0.2.9/32"]')
    gone = Keyring({"k1": K1}).seal("carol@example.test")               # k1 not in the ring
    env, idxs = _env(fb.verp_sender(os.urandom(16), 0, gone, time.time()))
    verdict = Evidence(fb, env, idxs, _bounce("carol@example.test")).prove("carol@example.test")
    assert verdict.proof is None and "recipient_hash" in _named(fb, "carol@example.test", verdict)
    sealed = Keyring({"k2": K2}).seal("dave@example.test")
    old = time.time() - 60 * 86400
    env, idxs = _env(verp.encode(os.urandom(16), 0, sealed, old, fb.key, "b", DOMAIN))
    verdict = Evidence(fb, env, idxs, _bounce("dave@example.test")).prove("dave@example.test")
    assert (verdict.proof, verdict.ignored) == (None, verp.EXPIRED)
    # a trusted FBL source vouches for the complaint, but cannot say whether it was sealed
    env, idxs = _env(f"fbl@{DOMAIN}")
    report = _complaint("erin@example.test")
    rcpt, verdict = Evidence(fb, env, idxs, report).first_proven([report.feedback.original_rcpt_to])
    assert verdict.proof == TRUSTED_SOURCE
    assert _named(fb, rcpt, verdict) == {"recipient": None,
                                         "recipient_hash": fb.hash_address("erin@example.test")}


def test_a_report_naming_thousands_costs_bounded_seals(tmp_path):
    fb = _feedback(tmp_path, {f"k{i}": os.urandom(64) for i in range(8)})
    sealed = Keyring({"k0": fb.sealed.keys["k0"]}).seal("target@example.test")
    env, idxs = _env(fb.verp_sender(os.urandom(16), 0, sealed, time.time()))
    named = [f"User{i}@example.test" for i in range(5000)]
    ev = Evidence(fb, env, idxs, _bounce(*named))
    t0 = time.perf_counter()
    for r in named:
        assert ev.prove(r).proof is None
    assert ev.seals <= MAX_SEALS
    assert time.perf_counter() - t0 < 5.0        # a loaded 2-core box: ~ms in fact
