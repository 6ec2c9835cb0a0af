"""mta/files: a state file is replaced whole; a secret is made once and never replaced."""
from __future__ import annotations

import os
import stat

import pytest

from mta import files


def test_write_atomic_replaces_whole_with_its_mode_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    files.write_atomic(path, b"one")
    files.write_atomic(path, b"two, longer")
    assert path.read_bytes() == b"two, longer"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_failing_keeps_the_old_content(tmp_path):
    path = tmp_path / "state.json"
    files.write_atomic(path, b"old")
    with pytest.raises(OSError):
        files.write_atomic(tmp_path / "missing-dir" / "state.json", b"new")
    assert path.read_bytes() == b"old"


def test_create_once_never_replaces(tmp_path):
    path = tmp_path / "keys" / "secret.key"
    assert files.create_once(path, b"first") is True
    assert files.create_once(path, b"second") is False
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["secret.key"], "no temporary left behind"
