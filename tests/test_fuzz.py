"""A short run of every coverage-guided fuzz target (tests/fuzz/, docs/fuzzing.md).

Each target runs in its own process (libFuzzer owns the process and exits on a
finding) for a few seconds from its seed corpus, in a fresh corpus directory so
the run does not depend on earlier ones; a finding fails the test with libFuzzer's
report, and the input it saved is named in the message. The long runs are
`make fuzz` (docs/fuzzing.md); these only prove each target and its invariants
still run clean against the current code.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "fuzz" / "run.py"
SECONDS = {"smtp_server": 8, "data_scanner": 8, "bounce_parser": 15, "spool_recovery": 8}


@pytest.mark.parametrize("target", sorted(SECONDS))
def test_fuzz_target_short_run(target, tmp_path):
    findings = tmp_path / "findings"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), target, "--seconds", str(SECONDS[target]),
         "--corpus", str(tmp_path / "corpus"), "--findings", str(findings)],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS[target] + 90)
    report = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))
    saved = sorted(p.name for p in findings.iterdir()) if findings.exists() else []
    assert proc.returncode == 0 and not saved, \
        f"{target}: exit {proc.returncode}, findings {saved}\n{report[-4000:]}"
    runs = [line for line in report.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split()[-1]) > 100, f"{target} barely ran:\n{report[-2000:]}"
