"""DKIM signing of outgoing mail (RFC 6376, RFC 8463 Ed25519).

signer.py is the API: load_key() and keygen()/dns_record() for keys, SignSpec
for one signature, Signer for signing single messages or batches on native
threads (mta._native.dkim, built from native/dkim/). Nothing here verifies
signatures: tests use dkimpy as the independent verifier.
"""
