"""An in-tree ISP simulator: mailbox providers with per-source-IP allowances, reputation,
greylisting, blocks, real reply texts and ARF complaint reports, on loopback (issue 12).

    python -m tools.isp_sim -c tools/isp_sim/providers.toml --day-seconds 60 --events out.jsonl

See README.md beside this file: the model (model.py), the allowance accounting the
benchmark compares against, and how to scale the MTA's time to the simulator's.
"""
from .config import Config, Reply, load, zone_records
from .model import Clock, Model
from .server import Simulator

__all__ = ["Clock", "Config", "Model", "Reply", "Simulator", "load", "zone_records"]
