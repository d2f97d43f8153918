"""The import graph's layering, from an AST scan of every import (top-level and function-local) in the packages.

- ``gan_models`` imports nothing from ``orchestrator``: models know nothing of Ray, S3, MLflow or the loop; the
  interface between them (``gan_models/protocol.py``) sits below both.
- No import cycles among the modules of ``orchestrator`` (function-local imports count: they may defer a heavy
  dependency, never hide a cycle). ``KNOWN_CYCLES`` is a ratchet, empty since the three cycles measured in
  ``../shared/ARCHITECTURE.md`` §3.1 were broken: a new cycle fails the build, and so does a listed one that no
  longer exists, so the list only ever shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gan_models", "orchestrator")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80
KNOWN_CYCLES: set[frozenset[str]] = set()  # none left; a cycle someone must accept goes here, with its reason


def modules(root: Path = REPO) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module → the project modules it imports anywhere in its file (``from a import b``: ``a``, and ``a.b`` when it
    is a module)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # an imported name, not a module: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_gan_models_imports_nothing_from_orchestrator():
    graph = import_graph()
    upward = sorted(
        f"{m} → {t}"
        for m, ts in graph.items()
        if m.startswith("gan_models")
        for t in ts
        if t.startswith("orchestrator")
    )
    assert not upward, f"gan_models must not import orchestrator: {upward}"


def test_no_import_cycles_beyond_the_known_ones():
    found = cycles(import_graph())
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not new, f"new import cycle(s): {new}"
    assert not gone, f"cycle(s) broken, remove them from KNOWN_CYCLES: {gone}"


def oversized(root: Path = REPO) -> list[str]:
    """Product files over MAX_FILE_LINES and functions over MAX_FUNCTION_LINES, as ``path[:function] (lines)``."""
    found = []
    for path in sorted(p for package in (*PACKAGES, "jobs") for p in (root / package).rglob("*.py")):
        text = path.read_text()
        rel, lines = path.relative_to(root), text.count("\n")
        if lines > MAX_FILE_LINES:
            found.append(f"{rel} ({lines} lines)")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.name} ({length} lines)")
    return found


def test_no_file_over_500_lines_and_no_function_over_80():
    assert not oversized(), f"split these (limits {MAX_FILE_LINES} / {MAX_FUNCTION_LINES} lines): {oversized()}"


def test_the_size_check_sees_a_long_function(tmp_path):
    (tmp_path / "orchestrator").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "orchestrator" / "long.py").write_text(f"def long():\n{body}")
    assert oversized(tmp_path) == [f"orchestrator/long.py:long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_the_scan_sees_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: a copy of the packages with ``from orchestrator import config`` added to a model
    file, and a cycle between two modules, is caught."""
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            dest = tmp_path / path.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(path.read_text())
    model = tmp_path / "gan_models" / "ema.py"
    model.write_text("from orchestrator import config\n" + model.read_text())
    (tmp_path / "orchestrator" / "env.py").write_text("import orchestrator.stack\n")  # stack imports env
    graph = import_graph(tmp_path)
    assert "orchestrator.config" in graph["gan_models.ema"]
    assert any({"orchestrator.env", "orchestrator.stack"} <= c for c in cycles(graph) - KNOWN_CYCLES)


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == {frozenset({"a", "b", "c"})}
