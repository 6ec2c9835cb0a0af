#!/usr/bin/env python3
"""Write docs/config.md from the key tables in mta/config/schema.py.

    python3 tools/gen_config_doc.py           # rewrite docs/config.md
    python3 tools/gen_config_doc.py --check   # exit 1 if docs/config.md is stale

tests/test_config.py runs render_doc() and compares, so a schema change without a regenerated
doc fails the suite (Postfix `mantools/check-postconf-*`).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mta.config.schema import SECTIONS, keys_of  # noqa: E402
from mta.config.values import VALUE_TYPES, Key, render  # noqa: E402

DOC_PATH = ROOT / "docs" / "config.md"

_INTRO = """\
The daemon reads one TOML file: `mta serve -c mta.toml`. Without `-c` it runs on the
built-in `mta/config/default.toml` (SMTP on 127.0.0.1:2525, spool in `./var/spool`, logs
in `./var/log`, relative to the working directory). `mta check-config -c FILE` prints the
problems the daemon would refuse to start with, and exits non-zero if there are any.

Every key is optional and takes the default below. An unknown key is an error, and every
error names the key path (`listener[0].port`) and says what is allowed. The command-line
flags `--listen HOST:PORT` (`[::1]:2525` for IPv6) and `--spool-dir DIR` replace
`listener[0].address`/`port` and `spool.directory`.

A running daemon re-reads the file on SIGHUP (`systemctl reload mta`, or `POST
/control/reload` on the admin API): the new file is checked as at start, and a file with
problems is refused (the problems are logged) while the old configuration stays in force.
Keys marked *needs a restart* below keep their running value on a reload: a reload that
changes one logs a warning naming it. Everything else (shaping files and the delivery
defaults they sit on, sources, pools, egress rules, queue classes, DKIM keys and signing
policy, log file mode and buffer) applies at once; log files are reopened on every reload
and on SIGUSR1 (after logrotate). SIGTERM drains: new connections get 421, deliveries in
flight may finish for `[delivery] shutdown_grace`, then the daemon exits."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if text else "-"


def _code(text: str) -> str:
    return f"`{text}`"


def _row(name: str, k: Key) -> str:
    default = (f"same as {_code(k.inherit)}" if k.inherit is not None
               else _code(render(k.default)))
    allowed = _code(k.allowed()) if k.allowed() else ""
    doc = f"{k.doc} *(needs a restart)*" if k.restart else k.doc
    cells = [_code(name), k.type.name, default, allowed, doc]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_doc() -> str:
    """The full text of docs/config.md."""
    out = [
        "# Configuration reference",
        "",
        "Generated from mta/config/schema.py; DO NOT EDIT; run python3 tools/gen_config_doc.py",
        "",
        _INTRO,
        "",
        "## Value types",
        "",
        "| type | accepted values |",
        "| --- | --- |",
    ]
    out += [f"| {t.name} | {_cell(t.doc)} |" for t in VALUE_TYPES]
    for s in SECTIONS:
        heading = f"[[{s.name}]]" if s.many else f"[{s.name}]"
        out += ["", f"## {heading}", "", (s.cls.__doc__ or "").strip()]
        if s.many:
            out += ["", f"An array of tables; when the file has none, there is one "
                        f"`[[{s.name}]]` with every default."]
        out += ["", "| key | type | default | allowed | description |",
                "| --- | --- | --- | --- | --- |"]
        out += [_row(name, k) for name, k in keys_of(s.cls).items()]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render_doc()
    if argv[1:] == ["--check"]:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run python3 tools/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
