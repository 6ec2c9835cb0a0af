"""The admin API's bearer tokens on disk: the operator token file the daemon makes at start
and `mta` commands read (so a command reaches the daemon of its own config), and the
optional [admin] tokens_file of `ROLE TOKEN` lines. Apart from the server
(mta/control/admin.py), so a command that only reads a token loads no HTTP server.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from mta.config import Config
from mta.files import create_once

READ_ONLY, OPERATOR = "read-only", "operator"
ROLES = (READ_ONLY, OPERATOR)
_TOKEN = re.compile(r"[\x21-\x7e]{16,256}", re.ASCII)   # visible ASCII, no spaces
TOKEN_NAME = "admin.token"


class TokenError(Exception):
    """The token file is unreadable or does not hold a token (the text names the file)."""


def token_path(config: Config) -> Path:
    """[admin] token_file, or admin.token in the spool directory."""
    return config.admin.token_file or Path(config.spool.directory) / TOKEN_NAME


def read_token(path: Path) -> str:
    """The token in `path`; FileNotFoundError when missing, TokenError when unusable."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096).decode("ascii").strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TokenError(f"admin token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        text = ""
    if not _TOKEN.fullmatch(text):
        raise TokenError(f"admin token file {path}: not a token (16 to 256 visible ASCII "
                         "characters; delete it and the daemon makes a new one)")
    return text


def load_or_create_token(path: Path) -> str:
    """The token in `path`, written first (0600, 32 random bytes in hex) when missing.
    Created under a temporary name and linked into place, so a reader never sees half a
    token and two daemons racing on one file end with one token."""
    try:
        return read_token(path)
    except FileNotFoundError:
        pass
    token = secrets.token_hex(32)
    if not create_once(path, token.encode() + b"\n"):
        return read_token(path)   # another process made it first: theirs stands
    return token




def load_tokens_file(path: Path) -> dict[str, str]:
    """token -> role from a tokens file: `ROLE TOKEN` a line (read-only or operator), blank
    lines and `#` comments ignored. TokenError when unreadable, readable by group or
    others, or a line is not such a pair."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(1 << 20)
    except OSError as exc:
        raise TokenError(f"admin tokens file {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"admin tokens file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                         "group or others read it (chmod 600)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TokenError(f"admin tokens file {path}: not ASCII") from None
    tokens: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES or not _TOKEN.fullmatch(parts[1]):
            raise TokenError(f"admin tokens file {path} line {n}: want `ROLE TOKEN` with ROLE "
                             "read-only or operator and TOKEN 16 to 256 visible ASCII "
                             "characters")
        if parts[1] in tokens and tokens[parts[1]] != parts[0]:
            raise TokenError(f"admin tokens file {path} line {n}: the token has two roles")
        tokens[parts[1]] = parts[0]
    return tokens
