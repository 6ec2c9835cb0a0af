"""The import graph of mta/: no cycles, and no stage imports a later stage.

Every module under mta/ is parsed with `ast` (nothing is imported), and every
mta-internal import counts: at module level, inside functions and under
`if TYPE_CHECKING:` alike, because a cycle hidden behind TYPE_CHECKING is still
two modules that each need the other to be understood. `from mta import X`
counts as an import of X when X is a module, else of the package root (the
composition root).

RANKS orders the packages along the path a message takes; a module may import
its own package (any depth) and packages of a strictly lower rank only, so two
packages of one rank never import each other:

  0  mta._native    compiled extensions (their .pyx import nothing of mta)
  1  mta.model      the values stages pass: ids, queue names, records, replies
     mta.files      small files written whole (state files, keys, tokens)
  2  mta.config     typed key tables and the TOML loader
     mta.logs       the log writer
  3  mta.spool      durable storage
     mta.egress     sources, pools, sites, shaping
     mta.dkim       signing
  4  mta.feedback   classifier state, returned mail, VERP, suppression, DSNs
     mta.queues     scheduled and ready queues, retry
  5  mta.delivery   dispatchers, SMTP client, outcome rules
     mta.ingest     listeners, SMTP sessions, reception
  6  mta.control    admin API and operator actions
  7  root           mta, mta.__main__, mta.cli, mta.daemon, mta.server, mta.preflight,
                 mta.supervisor

A new package gets a rank here or the test fails: where it sits in the flow
is a decision, not an accident.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mta"

RANKS: dict[str, int] = {
    "mta._native": 0,
    "mta.model": 1, "mta.files": 1,
    "mta.config": 2, "mta.logs": 2,
    "mta.spool": 3, "mta.egress": 3, "mta.dkim": 3,
    "mta.feedback": 4, "mta.queues": 4,
    "mta.delivery": 5, "mta.ingest": 5,
    "mta.control": 6,
    "mta": 7, "mta.__main__": 7, "mta.cli": 7, "mta.daemon": 7, "mta.server": 7,
    "mta.supervisor": 7,
    "mta.preflight": 7,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (the longest known prefix)."""
    while name not in mods:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every mta module that `module` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                     for alias in node.names]
        for name in names:
            if name == "mta" or name.startswith("mta."):
                target = _owner(name, mods)
                if target and target != module:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {module: _imports(module, path, mods) for module, path in mods.items()}


def _rank_key(module: str) -> str | None:
    """The RANKS entry that covers `module`: its package, or itself for a root module.
    A module directly under mta/ that is not listed has none (it is not root by default)."""
    name = module
    while name not in RANKS:
        if name.count(".") <= 1:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _package(module: str) -> str:
    key = _rank_key(module)
    return key if key and RANKS[key] < RANKS["mta"] else "mta"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, set(c)) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete import loop inside a strongly connected component, for the message."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = min(n for n in graph[path[-1]] if n in component)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_every_module_has_a_rank():
    unranked = sorted(m for m in _graph() if _rank_key(m) is None)
    assert not unranked, f"got modules outside every ranked package {unranked}, want a RANKS entry"


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(module, target) for module, targets in sorted(graph.items()) for target in sorted(targets)
            if _package(target) != _package(module) and RANKS[_package(target)] >= RANKS[_package(module)]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    shown = "\n".join(" -> ".join(c) for c in cycles)
    assert not cycles, f"got import cycles, want none:\n{shown}"


def test_no_import_of_a_later_stage():
    upward = _upward(_graph())
    shown = "\n".join(f"{m} (rank {RANKS[_package(m)]}) imports {t} (rank {RANKS[_package(t)]})"
                      for m, t in upward)
    assert not upward, f"got imports of a same or later stage, want only earlier ones:\n{shown}"


def test_model_is_a_leaf():
    graph = _graph()
    reach = sorted({t for m, ts in graph.items() if _package(m) == "mta.model" for t in ts
                    if _package(t) not in ("mta.model", "mta._native")})
    assert not reach, f"got mta.model importing {reach}, want nothing of mta but mta._native"


def test_the_checker_sees_what_it_must(tmp_path):
    """The graph builder itself: relative, TYPE_CHECKING and function-level imports count."""
    mods = {"mta.spool": Path(), "mta.cli": Path(), "mta.model.ids": Path(),
            "mta.feedback.bounce": Path(), "mta.feedback.bounce.report": Path()}
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\n"
                     "from .report import Report\n"
                     "from mta.model import ids\n"
                     "if TYPE_CHECKING:\n    from mta.spool import Spool\n"
                     "def main():\n    from mta.cli import main\n")
    got = _imports("mta.feedback.bounce.probe", probe, mods)
    want = {"mta.feedback.bounce.report", "mta.model.ids", "mta.spool", "mta.cli"}
    assert got == want, f"got {sorted(got)}, want {sorted(want)}"
    cases = [   # (name, graph, want cycles)
        ("loop of three", {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
        ("chain", {"a": {"b"}, "b": set()}, []),
    ]
    for name, graph, want in cases:
        got_cycles = _cycles(graph)
        assert got_cycles == want, f"{name}: got {got_cycles}, want {want}"
    for module, want_key in [("mta.feedback.bounce.parser", "mta.feedback"), ("mta.cli", "mta.cli"),
                             ("mta", "mta"), ("mta.newthing", None), ("mta.newpkg.x", None)]:
        assert _rank_key(module) == want_key, f"{module}: got {_rank_key(module)}, want {want_key}"
