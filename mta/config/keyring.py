"""The recipient keyring file of `[privacy] keyring` (sealed recipients, mta/model/sealed.py).

Text, one key per line: `KEYID BASE64KEY` (key id 1-8 characters a-z 0-9, a 64-byte
AES-256-SIV key in standard or url-safe base64); `#` comments and blank lines are skipped;
`current KEYID` names the key tools seal new addresses with (default: the last key).
The file must not be readable by group or others (mode 0600): it is refused otherwise.
Rotation: add a line (`mta privacy keygen`), reload the MTA (SIGHUP: the file is read again;
a broken file refuses the whole reload and the running keys stay), then let the
application seal with the new key; remove the old line only once no queued message
uses it (the queue views show sealed recipients; the key id is between "e1" and "."):
a message whose key is gone is deferred (mta/delivery/dispatcher.py), not bounced.
"""
from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from mta.model.sealed import KEY_BYTES, KEY_ID, Keyring


class KeyringError(ValueError):
    pass


def parse_keyring(text: str, origin: str = "keyring") -> Keyring:
    keys: dict[str, bytes] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeyringError(f"{origin}:{n}: expected `KEYID BASE64KEY` or `current KEYID`")
        if parts[0] == "current":
            current = parts[1]
            continue
        kid, b64 = parts
        if not KEY_ID.match(kid):
            raise KeyringError(f"{origin}:{n}: key id {kid!r}: 1 to 8 characters a-z 0-9")
        if kid in keys:
            raise KeyringError(f"{origin}:{n}: key id {kid!r} twice")
        try:
            key = base64.b64decode(b64.replace("-", "+").replace("_", "/") + "=" * (-len(b64) % 4),
                                   validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"{origin}:{n}: key {kid!r} is not base64") from None
        if len(key) != KEY_BYTES:
            raise KeyringError(f"{origin}:{n}: key {kid!r} has {len(key)} bytes, need {KEY_BYTES}")
        keys[kid] = key
    if not keys:
        raise KeyringError(f"{origin}: no keys")
    if current is not None and current not in keys:
        raise KeyringError(f"{origin}: current key {current!r} is not in the file")
    return Keyring(keys, current)


def load_keyring(path: Path | str) -> Keyring:
    """Read and check the keyring file; KeyringError (a ValueError) names the problem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyringError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(f"{path}: readable by group or others (mode "
                               f"{stat.S_IMODE(st.st_mode):o}): chmod 600")
        data = f.read(1 << 20)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyringError(f"{path}: not ASCII text") from None
    return parse_keyring(text, str(path))


def new_key_line(key_id: str) -> str:
    if not KEY_ID.match(key_id):
        raise KeyringError(f"key id {key_id!r}: 1 to 8 characters a-z 0-9")
    return f"{key_id} {base64.b64encode(os.urandom(KEY_BYTES)).decode()}\n"


# -- `mta privacy keygen | encrypt | decrypt` (operator only: it reads the key file) --------

def add_parser(sub) -> None:
    p = sub.add_parser("privacy", help="sealed recipients: keygen, encrypt, decrypt "
                       "(operator only: reads the keyring file)")
    psub = p.add_subparsers(dest="privacy_command", required=True)
    k = psub.add_parser("keygen", help="append a new random key KEYID to the keyring "
                        "(created with mode 0600); it becomes the current key unless the "
                        "file has a `current` line")
    k.add_argument("key_id", metavar="KEYID")
    k.add_argument("--keyring", required=True)
    k.set_defaults(func=_keygen)
    e = psub.add_parser("encrypt", help="print the sealed form of ADDRESS")
    e.add_argument("address", metavar="ADDRESS")
    e.add_argument("--keyring", required=True)
    e.add_argument("--key-id", help="default: the keyring's current key")
    e.set_defaults(func=_encrypt)
    d = psub.add_parser("decrypt", help="print the clear form of a sealed ADDRESS")
    d.add_argument("address", metavar="ADDRESS")
    d.add_argument("--keyring", required=True)
    d.set_defaults(func=_decrypt)


def _keygen(args) -> int:
    line = new_key_line(args.key_id)
    try:
        existing = load_keyring(args.keyring)
    except KeyringError as exc:
        if os.path.exists(args.keyring) and "no keys" not in str(exc):
            raise SystemExit(f"mta privacy: {exc}") from None
        existing = None
    if existing is not None and args.key_id in existing.keys:
        raise SystemExit(f"mta privacy: key id {args.key_id!r} is already in {args.keyring}")
    fd = os.open(args.keyring, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"key {args.key_id} added to {args.keyring}")
    return 0


def _encrypt(args) -> int:
    ring = _ring(args)
    try:
        print(ring.seal(args.address, args.key_id))
    except ValueError as exc:
        raise SystemExit(f"mta privacy: {exc}") from None
    return 0


def _decrypt(args) -> int:
    from mta.model.sealed import Unsealable
    ring = _ring(args)
    try:
        clear = ring.open(args.address)
    except Unsealable as exc:
        raise SystemExit(f"mta privacy: does not open: {exc}") from None
    if clear is None:
        raise SystemExit("mta privacy: not a sealed address")
    print(clear)
    return 0


def _ring(args) -> Keyring:
    try:
        return load_keyring(args.keyring)
    except KeyringError as exc:
        raise SystemExit(f"mta privacy: {exc}") from None
