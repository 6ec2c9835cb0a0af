#!/usr/bin/env python3
"""Relay throughput spread over 1,024 egress sources versus one source, same run.

Drives ../shared/tools/peerbench in relay mode (smtp-source at c=50 -> mta on
127.0.0.1:2525 -> smtp-sink on 127.0.0.1:2526, N messages) against two
configs of the same daemon, alternating (A, B, A, B) on this noisy 2-core
VM: one [[source]] (127.1.0.1), and a pool of 1,024 sources on
127.1.0.1-127.1.4.0, where every message takes the next source (smooth weighted
round-robin), so each (source, site) opens its own connections. Prints the
medians and the ratio many/one (goal: no worse than 0.9).

    python3 bench/egress_spread.py                 # 2 KB, 3 rounds, 20,000 messages
    python3 bench/egress_spread.py -s 51200 -r 5
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept_bench import STATE, parse_args  # noqa: E402
from relay_bench import alternate, mta_target  # noqa: E402

NET = ipaddress.ip_network("127.1.0.0/21")


def sources_config(count: int) -> Path:
    work = STATE / "mta-relay"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / f"egress-{count}.toml"
    parts = [f'[[source]]\nname = "s{i}"\naddress = "{NET[i + 1]}"\n' for i in range(count)]
    names = ", ".join(f'"s{i}"' for i in range(count))
    parts.append(f'[[pool]]\nname = "spread"\nsources = [{names}]\n')
    parts.append('[egress]\ndefault_pool = "spread"\n')
    conf.write_text("\n".join(parts))
    return conf


def main() -> int:
    args = parse_args(__doc__)
    if args.size == [51200, 2048]:      # not given: small messages stress connections most
        args.size = [2048]
    one, many = sources_config(1), sources_config(1024)
    for size in args.size:
        a, b = alternate("", size, args.n, args.rounds,
                         ("mta-1-source", "1 source", mta_target(sys.executable, one)),
                         ("mta-1024-sources", "1024 sources", mta_target(sys.executable, many)))
        print(f"RESULT egress_spread size={size} n={args.n} c=50 rounds={args.rounds} "
              f"one_source_per_s={a:.0f} sources_1024_per_s={b:.0f} ratio={b / a:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
