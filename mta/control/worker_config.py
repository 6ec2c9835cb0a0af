"""The config each worker process of a node runs on (`[server] workers = N`): its spool
shard, its admin port and its share of the node's budgets. Used by the supervisor, by each
worker at start and by the `mta` commands that ask every worker of the node, which is why
it is apart from mta/supervisor.py: a command loads no daemon.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mta.config import Config
from mta.control.token import token_path
from mta.model.node import WorkerSlot


def slot_of(text: str, config: Config) -> WorkerSlot:
    """`--worker I/N` -> this node's WorkerSlot (ValueError when malformed)."""
    index, _, count = text.partition("/")
    node = config.server.node
    return (WorkerSlot(int(index), int(count), node) if node
            else WorkerSlot(int(index), int(count)))


def per_worker(budget: int, workers: int) -> int:
    """A node's budget split across its workers: rounded up, at least 1 (0 stays 0: off)."""
    return 0 if budget <= 0 else max(1, -(-budget // workers))


def worker_config(config: Config, slot: WorkerSlot) -> Config:
    """The config worker `slot` runs on: its spool shard and admin port, one admin token, and
    its share of the node's budgets (each 1/N, rounded up): [egress] max_connections, each
    listener's max_connections, [server] data_memory_budget, [spool] hot_cache, [bounces]
    parse_workers."""
    if slot.count == 1:
        return config
    n = slot.count
    admin = config.admin
    listen = admin.listen
    if listen is not None and listen[1]:
        listen = (listen[0], slot.admin_port(listen[1]))
    admin = dataclasses.replace(admin, listen=listen, token_file=token_path(config))
    spool = dataclasses.replace(config.spool,
                                directory=Path(config.spool.directory) / f"w{slot.index}",
                                hot_cache=per_worker(config.spool.hot_cache, n))
    server = dataclasses.replace(
        config.server, data_memory_budget=per_worker(config.server.data_memory_budget, n))
    egress = dataclasses.replace(config.egress,
                                 max_connections=per_worker(config.egress.max_connections, n))
    listeners = tuple(dataclasses.replace(lst, max_connections=per_worker(lst.max_connections, n))
                      for lst in config.listener)
    bounces = dataclasses.replace(config.bounces,
                                  parse_workers=per_worker(config.bounces.parse_workers, n))
    return dataclasses.replace(config, spool=spool, admin=admin, server=server, egress=egress,
                               listener=listeners, bounces=bounces)
