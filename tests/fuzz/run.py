"""Run one coverage-guided fuzz target (atheris, i.e. libFuzzer driving Python).

    .venv/bin/python tests/fuzz/run.py TARGET [--seconds N | --runs N] [--native]
                                              [--corpus DIR] [-libfuzzer_flag=value ...]
    .venv/bin/python tests/fuzz/run.py TARGET FILE...     # replay inputs (a crash file)

TARGET is a module of this directory (see TARGETS). Each defines seeds() (the
starting corpus), test_one_input(data) (raises AssertionError when an invariant
breaks), MAX_LEN and TIMEOUT (seconds per input); TARGET.dict beside it, when
there is one, is a libFuzzer dictionary. TARGETS names the packages whose Python
bytecode atheris instruments for coverage feedback.

The corpus grows in build/fuzz/corpus/TARGET (seeded on first use); crashes, hangs
and their inputs go to build/fuzz/findings/TARGET/. Exit status 0: nothing found.

--native loads the wire extension built by `make fuzz-build` (clang,
-fsanitize=address,fuzzer-no-link) instead of the in-place one, so libFuzzer also
sees the branches of the C scanner and the Cython state machine; without it the
native targets are guided by Python-level coverage only (see docs/fuzzing.md).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# target -> packages instrumented (besides the target itself); test_wire_data holds
# the reference model of DATA unstuffing that two targets check the C scanner against
TARGETS = {
    "smtp_server": ["mta", "test_wire_data"],
    "data_scanner": ["mta", "test_wire_data"],
    "bounce_parser": ["mta", "email"],
    "spool_recovery": ["mta"],
}
NATIVE_BUILD = ROOT / "build" / "fuzz" / "lib"
WORK = ROOT / "build" / "fuzz"


def _load_native_wire() -> None:
    """Put the instrumented wire extension in place of mta._native.wire before anything imports it."""
    found = glob.glob(str(NATIVE_BUILD / "mta" / "_native" / "wire.*.so"))
    if not found:
        sys.exit(f"no instrumented wire extension under {NATIVE_BUILD}: run `make fuzz-build` first")
    newer = [p.name for p in (ROOT / "native" / "wire").iterdir()
             if p.suffix in (".pyx", ".pxi", ".c", ".h") and p.name != "wire.c"
             and p.stat().st_mtime > os.path.getmtime(found[0])]
    if newer:   # fuzzing old code would report its bugs, or miss the new ones
        sys.exit(f"{found[0]} is older than native/wire/{', '.join(sorted(newer))}: run `make fuzz-build`")
    spec = importlib.util.spec_from_file_location("mta._native.wire", found[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mta._native.wire"] = module
    spec.loader.exec_module(module)


def _reexec_with_preload() -> None:
    """libFuzzer must be loaded before the instrumented extension (atheris' native_extension_fuzzing.md)."""
    import atheris
    preload = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    if os.environ.get("LD_PRELOAD") == preload:
        return
    env = dict(os.environ, LD_PRELOAD=preload)
    # Python leaks by design at start-up; an out-of-memory is a finding (-rss_limit_mb), not an abort.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1:quarantine_size_mb=16")
    # every object through malloc, so ASan sees the bytearrays the scanner writes into
    # (pymalloc would hide an overflow inside its arenas)
    env.setdefault("PYTHONMALLOC", "malloc")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def seed_corpus(target, directory: Path) -> int:
    """Write the target's seeds into `directory` (named by content hash, so re-seeding is idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for data in target.seeds():
        data = data[:target.MAX_LEN]
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
        n += 1
    return n


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("inputs", nargs="*", help="replay these files instead of fuzzing")
    ap.add_argument("--seconds", type=int, help="stop after this many seconds")
    ap.add_argument("--runs", type=int, help="stop after this many executions")
    ap.add_argument("--corpus", type=Path, help="corpus directory (default build/fuzz/corpus/TARGET)")
    ap.add_argument("--findings", type=Path, help="where crash inputs go (default build/fuzz/findings/TARGET)")
    ap.add_argument("--native", action="store_true", help="use the clang-instrumented wire extension")
    args, extra = ap.parse_known_args(argv)   # the rest (-flag=value) goes to libFuzzer

    if args.native:
        _reexec_with_preload()
    import atheris

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    if args.native:
        _load_native_wire()
    sys.path.insert(0, str(HERE.parent))   # test_wire_data
    sys.path.insert(0, str(ROOT / "tools"))   # corpora: where the seed corpora are
    with atheris.instrument_imports(include=[args.target, *TARGETS[args.target]]):
        target = importlib.import_module(args.target)

    flags = [f"-max_len={target.MAX_LEN}", f"-timeout={target.TIMEOUT}", "-rss_limit_mb=2048",
             "-print_final_stats=1"]
    dictionary = HERE / f"{args.target}.dict"   # the protocol's words, for the mutator
    if dictionary.exists():
        flags.append(f"-dict={dictionary}")
    if args.inputs:
        return _fuzz(atheris, target, [*args.inputs, *flags])
    corpus = args.corpus or WORK / "corpus" / args.target
    findings = args.findings or WORK / "findings" / args.target
    findings.mkdir(parents=True, exist_ok=True)
    os.environ["MTA_FUZZ_FINDINGS"] = str(findings)   # for findings that are not crashes
    print(f"[fuzz] {args.target}: {seed_corpus(target, corpus)} seeds in {corpus}", file=sys.stderr)
    flags.append(f"-artifact_prefix={findings}/")
    if args.seconds:
        flags.append(f"-max_total_time={args.seconds}")
    if args.runs:
        flags.append(f"-runs={args.runs}")
    return _fuzz(atheris, target, [str(corpus), *flags, *extra])


def _fuzz(atheris, target, flags: list[str]) -> int:
    atheris.Setup([sys.argv[0], *flags], target.test_one_input)
    atheris.Fuzz()   # returns only when libFuzzer ran out of time or runs; findings exit non-zero
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
