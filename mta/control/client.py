"""The admin API's client side, shared by the `mta` commands that talk to a running daemon."""
from __future__ import annotations

import http.client

import orjson

from mta.config import Config


class AdminUnreachable(SystemExit):
    """The daemon's admin API is off or does not answer (the text says which and where)."""


def admin_request(config: Config, path: str, body: dict | None = None) -> tuple[int, object]:
    """GET `path` from the daemon's admin API, or POST `body` as JSON to it;
    returns (HTTP status, decoded JSON)."""
    target = config.admin.listen
    if target is None:
        raise AdminUnreachable("mta: the admin API is disabled ([admin] listen = \"\")")
    conn = http.client.HTTPConnection(*target, timeout=10)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    except OSError as exc:
        raise AdminUnreachable(f"mta: cannot reach the daemon's admin API at "
                               f"{target[0]}:{target[1]}: {exc}") from None
    finally:
        conn.close()
