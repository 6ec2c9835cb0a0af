"""The admin API's client side, shared by the `mta` commands that talk to a running daemon.

The address and the bearer token both come from the command's config ([admin] listen and
token_file), so a command reaches the daemon started with that config and no other: a
daemon with another token answers 401.
"""
from __future__ import annotations

import argparse
import http.client
import sys
from collections.abc import Sequence

import orjson

from mta.config import Config
from mta.control.nodeview import NodeAnswer, WorkerAnswer, merge
from mta.control.token import TokenError, read_token, token_path


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
    # the daemon gives a request [admin] timeout (408 past it): waiting longer is pointless,
    # and a stopped worker of a node is named that much sooner
    conn = http.client.HTTPConnection(*target, timeout=config.admin.timeout + 1)
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


def node_request(configs: Sequence[Config], path: str,
                 body: dict | None = None) -> NodeAnswer:
    """`admin_request` to every worker of a node (`configs[I]`: worker I's config, from
    mta/control/worker_config.py), merged as the node's answer
    (mta/control/nodeview.py). AdminUnreachable when no worker answers."""
    answers = []
    for index, config in enumerate(configs):
        try:
            status, data = admin_request(config, path, body)
        except AdminUnreachable as exc:
            answers.append(WorkerAnswer(index, 0, None, str(exc.code).removeprefix("mta: ")))
            continue
        error = data.get("error", "") if isinstance(data, dict) and status != 200 else ""
        answers.append(WorkerAnswer(index, status, data, str(error)))
    if not any(a.answered for a in answers):
        raise AdminUnreachable("mta: no worker of the node answered: " + "; ".join(
            f"worker {a.worker}: {a.error}" for a in answers))
    return merge("POST" if body is not None else "GET", path, answers)


def cli_request(args: argparse.Namespace, path: str,
                body: dict | None = None) -> tuple[int, object]:
    """What an `mta` command asks: the node (`args.node`, every worker's config, set by
    mta/cli.py when [server] workers > 1 and no --worker is given) or the one daemon of
    `args.load_config(args)`. A worker left out of the node's answer is named on stderr and
    `args.partial` set: mta/cli.py exits non-zero, the view shown is not the whole node."""
    node = getattr(args, "node", None)
    if not node:
        return admin_request(args.load_config(args), path, body)
    answer = node_request(node, path, body)
    for line in answer.problems():
        print(f"mta: {line} (left out of this view)", file=sys.stderr)
    if answer.missing:
        args.partial = True
    return answer.status, answer.data
