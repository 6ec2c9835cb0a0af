"""The admin API's client side, shared by the `mta` commands that talk to a running daemon.

The address and the bearer token both come from the command's config ([admin] listen and
token_file), so a command reaches the daemon started with that config and no other: a
daemon with another token answers 401.
"""
from __future__ import annotations

import http.client

import orjson

from mta.config import Config
from mta.control.admin import TokenError, read_token, token_path


class AdminUnreachable(SystemExit):
    """The daemon's admin API is off or does not answer (the text says which and where).
    `mta` prints the text and exits 3."""


def admin_request(config: Config, path: str, body: dict | None = None) -> tuple[int, object]:
    """GET `path` from the daemon's admin API, or POST `body` as JSON to it;
    returns (HTTP status, decoded JSON)."""
    target = config.admin.listen
    if target is None:
        raise AdminUnreachable("mta: the admin API is disabled ([admin] listen = \"\")")
    where = f"{target[0]}:{target[1]}"
    tfile = token_path(config)
    try:
        token = read_token(tfile)
    except FileNotFoundError:
        raise AdminUnreachable(f"mta: no admin token at {tfile}: is the daemon for "
                               f"{config.origin} running? (it creates the file at start)") from None
    except TokenError as exc:
        raise AdminUnreachable(f"mta: {exc}") from None
    headers = {"Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection(*target, timeout=10)
    try:
        if body is None:
            conn.request("GET", path, headers=headers)
        else:
            conn.request("POST", path, orjson.dumps(body),
                         {**headers, "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read(64 << 20)
    except OSError as exc:
        raise AdminUnreachable(f"mta: cannot reach the daemon's admin API at {where}: "
                               f"{exc}") from None
    finally:
        conn.close()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AdminUnreachable(f"mta: {where} did not answer as the admin API "
                               f"(HTTP {resp.status})") from None
    if resp.status == 401:
        raise AdminUnreachable(f"mta: the daemon at {where} refused the token in {tfile}: "
                               "it was started with another config or token") from None
    return resp.status, data
