"""CLI: python -m tools.isp_sim -c providers.toml [--day-seconds 60] [--events out.jsonl] ...

Prints one line `isp_sim: ready http=HOST:PORT addresses=N` when it listens; stops
cleanly (flushes the event log, writes --stats-file, sends queued ARF reports for up
to 5 s) on SIGTERM or SIGINT; SIGUSR1 writes --stats-file and goes on.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python tools/isp_sim/__main__.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "isp_sim"

from .config import load, zone_records  # noqa: E402
from .server import Simulator  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.isp_sim", description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(Path(__file__).with_name("providers.toml")),
                    help="providers file (TOML)")
    ap.add_argument("--day-seconds", type=float, help="wall seconds per simulated day (default 86400)")
    ap.add_argument("--port", type=int, help="SMTP port on every MX address (default 25)")
    ap.add_argument("--volume-scale", type=float, help="multiply every per-hour/per-day allowance")
    ap.add_argument("--fbl-to", help="address ARF reports are sent to (the MTA's bounce domain)")
    ap.add_argument("--fbl-host", help="host:port of the MTA listener that takes the reports")
    ap.add_argument("--no-tls", action="store_true", help="do not offer STARTTLS")
    ap.add_argument("--events", help="append one JSON line per transaction to this file")
    ap.add_argument("--stats-file", help="write the /stats JSON here at exit and on SIGUSR1")
    ap.add_argument("--http", default="127.0.0.1:0", help="host:port of the HTTP endpoint ('' = none)")
    ap.add_argument("--clock-control", action="store_true", help="allow POST /clock?advance=SECONDS")
    ap.add_argument("--zone", action="store_true", help="print the DNS records and exit")
    ap.add_argument("--zone-file", help="write the DNS records (one zone-file line each) here, then serve")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config, day_seconds=args.day_seconds, port=args.port, volume_scale=args.volume_scale,
                   fbl_to=args.fbl_to, fbl_host=args.fbl_host, tls=False if args.no_tls else None)
    except (OSError, ValueError) as e:
        print(f"isp_sim: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.zone:
        print("\n".join(zone_records(cfg)))
        return 0
    if args.zone_file:
        Path(args.zone_file).write_text("\n".join(zone_records(cfg)) + "\n")
    sim = Simulator(cfg, events=args.events, http=args.http or None, clock_control=args.clock_control)

    def write_stats() -> None:
        if args.stats_file:
            tmp = Path(args.stats_file + ".tmp")
            tmp.write_text(json.dumps(sim.stats_now(), indent=1))
            tmp.replace(args.stats_file)

    def ready() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, sim.request_stop)
        loop.add_signal_handler(signal.SIGINT, sim.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, write_stats)
        print(f"isp_sim: ready http={(args.http or 'none:').rpartition(':')[0]}:{sim.http_port} addresses={len(cfg.addresses())} "
              f"port={cfg.port} day_seconds={cfg.day_seconds:g}", flush=True)

    try:
        asyncio.run(sim.serve(ready=ready))
    except OSError as e:
        print(f"isp_sim: cannot listen: {e}", file=sys.stderr)
        return 1
    write_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
