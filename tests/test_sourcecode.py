"""House rules checked on every run (STYLE.md 1, 13, 14): the linter's error class,
the file-size cap, and protocol cores that do no I/O."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SOURCES = [p for p in ROOT.glob("**/*") if p.suffix in {".py", ".pyx", ".pxi", ".c", ".h"}
           and ".venv" not in p.parts and "build" not in p.parts
           and not (p.suffix == ".c" and p.with_suffix(".pyx").exists())]   # Cython output


def test_pyflakes_class_errors():
    ruff = shutil.which("ruff") or str((ROOT / ".venv" / "bin" / "ruff"))
    assert shutil.which(ruff), "ruff is not installed: tools/dev.sh installs requirements-dev.txt"
    out = subprocess.run([ruff, "check", "--select", "F", "--no-cache", "mta", "tests", "tools", "bench"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"got lint errors, want none:\n{out.stdout[-4000:]}"


def test_file_size_cap():
    big = {str(p.relative_to(ROOT)): n for p in SOURCES
           if (n := len(p.read_bytes().splitlines())) > 1000}
    assert not big, f"got files over 1,000 lines {big}, want them split by concept"


def test_protocol_cores_do_no_io():
    for p in (ROOT / "native" / "wire").glob("*.p*"):
        code = [ln for ln in p.read_text().splitlines() if not ln.lstrip().startswith("#")]
        text = re.sub(r'"""[\s\S]*?"""', "", "\n".join(code))   # prose may name the loop
        hits = re.findall(r"\b(import asyncio|asyncio\.|get_event_loop|Future|socket\.)", text)
        assert not hits, f"{p.name}: got {sorted(set(hits))}, want no loop or socket use in a core"


def test_every_module_has_a_docstring():
    missing = []
    for p in ROOT.glob("mta/**/*.py"):
        text = p.read_text()
        if not re.match(r'\s*(#.*\n)*\s*(r|)"""', text):
            missing.append(str(p.relative_to(ROOT)))
    assert not missing, f"got modules without a docstring {missing}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
