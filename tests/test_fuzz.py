"""A short run of every coverage-guided fuzz target (tests/fuzz/, docs/fuzzing.md).

Each target runs in its own process (libFuzzer owns the process and exits on a
finding) from its seed corpus, in a fresh corpus directory, with a fixed libFuzzer
seed and a fixed number of executions, so a run explores the same inputs every time
(the time limit only stops it early on a slow, loaded machine); a finding fails the
test with libFuzzer's report, and the input it saved is named in the message. Python
coverage guides these runs (the in-place extension is not instrumented); the long
runs with native coverage are `make fuzz` (docs/fuzzing.md).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "fuzz" / "run.py"
# target -> (executions, time limit in seconds): about 8 s each here when the box is idle
BUDGET = {"smtp_server": (12000, 10), "data_scanner": (40000, 10), "bounce_parser": (3500, 15),
          "spool_recovery": (18000, 10)}


@pytest.mark.parametrize("target", sorted(BUDGET))
def test_fuzz_target_short_run(target, tmp_path):
    findings = tmp_path / "findings"
    runs, seconds = BUDGET[target]
    proc = subprocess.run(
        [sys.executable, str(RUNNER), target, "--runs", str(runs), "--seconds", str(seconds), "-seed=1",
         "--corpus", str(tmp_path / "corpus"), "--findings", str(findings)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 90, check=False)
    report = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))
    saved = sorted(p.name for p in findings.iterdir()) if findings.exists() else []
    assert proc.returncode == 0 and not saved, \
        f"{target}: exit {proc.returncode}, findings {saved}\n{report[-4000:]}"
    executed = [line for line in report.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert executed and int(executed[0].split()[-1]) > 100, f"{target} barely ran:\n{report[-2000:]}"
