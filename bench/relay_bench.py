#!/usr/bin/env python3
"""End-to-end relay throughput: mta versus Postfix, same harness, same run.

Drives ../shared/tools/peerbench in relay mode: smtp-source (concurrency 50)
-> the MTA on 127.0.0.1:2525 -> smtp-sink on 127.0.0.1:2526, N messages,
throughput from first accept to last delivery. Postfix is peerbench's
private instance; mta runs `mta serve --smarthost 127.0.0.1:2526`. Targets
alternate (A, B, A, B) on this noisy 2-core VM; medians and the ratio are
printed, with peerbench's `ceiling` (loader + sink alone) for reference.

    python3 bench/relay_bench.py                  # 50 KB and 2 KB, 3 rounds
    python3 bench/relay_bench.py -s 51200 -r 5
    python3 bench/relay_bench.py --against /tmp/base  # A/B: this tree vs another checkout
                                                  # (its extensions built in place)
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept_bench import ROOT, STATE, parse_args, peerbench, postfix_target  # noqa: E402

PORT, SINK = 2525, 2526


def dkim_config(algorithm: str) -> Path:
    """A config that signs smtp-source's mail (From: ...@peerbench.localdomain)."""
    from mta.dkim.signer import keygen
    work = STATE / "mta-relay"
    work.mkdir(parents=True, exist_ok=True)
    pem, _ = keygen(algorithm, 2048)
    (work / f"{algorithm}.pem").write_bytes(pem)
    conf = work / f"dkim-{algorithm}.toml"
    conf.write_text(f'[[dkim]]\ndomain = "peerbench.localdomain"\nselector = "bench"\n'
                    f'key_file = "{work}/{algorithm}.pem"\n')
    return conf


def mta_target(python: str, config: Path | None = None, root: Path = ROOT) -> list[str]:
    """peerbench target args for `mta serve` from the tree at `root`."""
    work = STATE / "mta-relay"
    conf = f"-c {config} " if config else ""
    start = (f"mkdir -p {work} && cd {work} && rm -rf spool var && PYTHONPATH={root} exec {python} "
             f"-m mta serve {conf}--listen 127.0.0.1:{PORT} --spool-dir {work}/spool "
             f"--smarthost 127.0.0.1:{SINK} --dns 127.0.0.1:9 --admin 127.0.0.1:8026 2>>{work}/daemon.err")
    # the same config and spool as the daemon: the admin token is <spool>/admin.token
    queue = (f"cd {work} && PYTHONPATH={root} {python} -m mta queue count {conf}"
             f"--spool-dir {work}/spool --admin 127.0.0.1:8026")
    return ["--foreground", "--start", start, "--queue-cmd", queue]


def alternate(label: str, size: int, n: int, rounds: int, first: tuple[str, str, list[str]],
              second: tuple[str, str, list[str]]) -> tuple[float, float]:
    """Relay runs of two targets (peerbench name, label, target args), A B A B ...;
    prints each round, returns the two medians of deliveries per second."""
    runs: tuple[list[float], list[float]] = ([], [])
    for rnd in range(rounds):
        for out, (name, _, target) in zip(runs, (first, second)):
            out.append(float(peerbench(name, size, n, target, mode="relay")["deliver_per_s"]))
        print(f"size={size} {label}round {rnd + 1}: {first[1]} {runs[0][-1]:.0f}/s  "
              f"{second[1]} {runs[1][-1]:.0f}/s", flush=True)
    return statistics.median(runs[0]), statistics.median(runs[1])


def main() -> int:
    args = parse_args(__doc__, extra=[("--dkim", dict(choices=["rsa", "ed25519"], action="append",
                                                       help="also run mta signing every message")),
                                      ("--against", dict(type=Path, metavar="TREE",
                                                         help="A/B against mta from another checkout"))])
    (STATE / "mta-relay").mkdir(parents=True, exist_ok=True)
    if args.dkim:
        return dkim_runs(args)
    if args.against:
        return tree_runs(args)
    for size in args.size:
        ceiling = float(peerbench("ceiling", size, args.n, [], mode="ceiling", port=SINK)["deliver_per_s"])
        b, a = alternate("", size, args.n, args.rounds, ("postfix", "postfix", postfix_target()),
                         ("mta", "mta", mta_target(sys.executable)))
        print(f"RESULT relay size={size} n={args.n} c=50 rounds={args.rounds} mta_per_s={a:.0f} "
              f"postfix_per_s={b:.0f} ratio={a / b:.2f} ceiling_per_s={ceiling:.0f}", flush=True)
    return 0


def tree_runs(args) -> int:
    """This tree versus another checkout of mta, alternating: the cost of a change."""
    for size in args.size:
        b, a = alternate("", size, args.n, args.rounds,
                         ("mta-base", "base", mta_target(sys.executable, root=args.against.resolve())),
                         ("mta", "this", mta_target(sys.executable)))
        print(f"RESULT relay_ab size={size} n={args.n} this_per_s={a:.0f} base_per_s={b:.0f} "
              f"ratio={a / b:.2f} base={args.against}", flush=True)
    return 0


def dkim_runs(args) -> int:
    """Signing on versus off, alternating, same sizes: the cost of DKIM end to end."""
    sys.path.insert(0, str(ROOT))
    for size in args.size:
        for alg in args.dkim:
            conf = dkim_config(alg)
            b, a = alternate(f"{alg} ", size, args.n, args.rounds,
                             ("mta", "unsigned", mta_target(sys.executable)),
                             (f"mta-dkim-{alg}", "signed", mta_target(sys.executable, conf)))
            print(f"RESULT relay_dkim size={size} alg={alg} n={args.n} signed_per_s={a:.0f} "
                  f"unsigned_per_s={b:.0f} ratio={a / b:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
