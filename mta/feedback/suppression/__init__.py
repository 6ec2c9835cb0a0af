"""The suppression list: hashed addresses we must not send to (issue 5).

store.py holds the list (SQLite, keyed HMAC-SHA256 hashes, never raw addresses);
cli.py is `mta suppress add|remove|check|import|export|purge`.
"""
from mta.feedback.suppression.store import (Entry, KeyFileError, SuppressionList, address_hash,
                                   hash_text, load_key, load_or_create_key, normalise,
                                   parse_hash)

__all__ = ["Entry", "KeyFileError", "SuppressionList", "address_hash", "hash_text",
           "load_key", "load_or_create_key", "normalise", "parse_hash"]
