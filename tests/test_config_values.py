"""The one TOML value checker (mta/config/values.py) behind the config, the shaping files
and the bounce rule files: a file's problems and a bad value read the same in all three,
each naming the file and the key path; one Rate type."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from conftest import ROOT
from mta.config import ConfigError, load_config, parse_config
from mta.config.values import parse_rate
from mta.egress.shaping import Shaping, ShapingError
from mta.feedback.bounce import Classifier, RulesError
from mta.model.rate import Rate

DELIVERY = dataclasses.asdict(parse_config("").delivery)

# (kind, load one file, the error it raises)
LOADERS = [
    ("config", lambda path: load_config(path), ConfigError),
    ("shaping", lambda path: Shaping.load([path], DELIVERY, shipped=False), ShapingError),
    ("rules", lambda path: Classifier([path]), RulesError),
]


def _problem(tmp_path: Path, kind: str, content: bytes | None) -> str:
    path = tmp_path / f"{kind}.toml"
    if content is not None:
        path.write_bytes(content)
    load, error = next((load, error) for k, load, error in LOADERS if k == kind)
    with pytest.raises(error) as e:
        load(path)
    text = str(e.value)
    assert text.startswith(f"{path}: "), f"got {text!r}, want it to start with the file name"
    return text[len(f"{path}: "):]


@pytest.mark.parametrize("kind", [k for k, _, _ in LOADERS])
@pytest.mark.parametrize("content, want", [
    (None, "cannot read the file: No such file or directory"),
    (b'x = "\xff"\n', "not UTF-8 (TOML files must be): invalid byte at offset 5"),
    (b"x = \n", "TOML syntax error at line 1, column 5: Invalid value"),
])
def test_file_problems_read_alike(tmp_path: Path, kind: str, content: bytes | None,
                                  want: str) -> None:
    got = _problem(tmp_path, kind, content)
    assert got == want, f"{kind}: got {got!r}, want {want!r}"


BAD_REGEX = ('"(unclosed" is not a regular expression: missing ), unterminated subpattern '
             'at position 0')
BAD_RATE = ('"10/fortnight" is not a rate: unknown unit "fortnight" (a string "COUNT/UNIT" '
            'with UNIT s, m, h or d (or sec, min, hour, day), optionally with a number: '
            '"10/s", "600/m", "5000/h", "100/5m"; or "unlimited")')
BAD_DURATION = ('"soon" is not a duration (seconds as a number, or a string like "250ms", '
                '"30s", "5m", "1h", "1h30m")')


@pytest.mark.parametrize("kind, body, want", [
    ("shaping", '["default"]\nbackoff_on = ["(unclosed"]\n',
     f"[default]: backoff_on[0]: {BAD_REGEX}"),
    ("rules", '[[rule]]\nname = "x"\ncategory = "policy"\ntext = ["ok", "(unclosed"]\n',
     f"rule #1 ('x'): text[1]: {BAD_REGEX}"),
    ("rules", '[[rule]]\nname = "x"\ncategory = "policy"\nnot_text = "(unclosed"\n',
     f"rule #1 ('x'): not_text: {BAD_REGEX}"),
    ("config", '[[queue_class]]\nname = "x"\nmax_message_rate = "10/fortnight"\n',
     f"queue_class[0].max_message_rate: {BAD_RATE}"),
    ("shaping", '["default"]\nmax_message_rate = "10/fortnight"\n',
     f"[default]: max_message_rate: {BAD_RATE}"),
    ("config", '[delivery]\nidle_timeout = "soon"\n', f"delivery.idle_timeout: {BAD_DURATION}"),
    ("shaping", '["gmail.com"]\nidle_timeout = "soon"\n',
     f'["gmail.com"]: idle_timeout: {BAD_DURATION}'),
    ("config", "[delivery]\nhold = 1\n",
     "delivery.hold: expected a boolean (true or false), got integer 1"),
    ("rules", '[[rule]]\nname = "x"\ncategory = "policy"\nhard = 1\n',
     "rule #1 ('x'): hard: expected a boolean (true or false), got integer 1"),
])
def test_bad_values_read_alike(tmp_path: Path, kind: str, body: str, want: str) -> None:
    got = _problem(tmp_path, kind, body.encode())
    assert got == want, f"{kind}: got {got!r}, want {want!r}"


def test_one_rate_type(tmp_path: Path) -> None:
    config = parse_config('[[queue_class]]\nname = "x"\nmax_message_rate = "600/m"\n')
    shaping_file = tmp_path / "s.toml"
    shaping_file.write_text('["default"]\nmax_message_rate = "600/m"\n')
    shaping = Shaping.load([shaping_file], DELIVERY, shipped=False)
    limits = shaping.limits("a", "x.org", ["mx.x.org"])
    got = [parse_rate("600/m"), config.queue_class[0].max_message_rate, limits.max_message_rate]
    assert all(type(r) is Rate and r == Rate(600, 60) for r in got), \
        f"got {got}, want Rate(600, 60) three times"


def test_rate_defined_once() -> None:
    """No twin: one Rate class and one "rate" value type in the whole package."""
    classes, types = [], []
    for path in sorted((ROOT / "mta").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name == "Rate":
                classes.append(str(path.relative_to(ROOT)))
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ValueType"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "rate"):
                types.append(str(path.relative_to(ROOT)))
    assert classes == ["mta/model/rate.py"], f"got Rate classes in {classes}, want one"
    assert types == ["mta/config/values.py"], f"got rate value types in {types}, want one"
