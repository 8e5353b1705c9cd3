"""The package's shape: imports flow one way (no cycle, function-level imports included), no module grows past
one generous ceiling (an alarm: modules are split by job, not by line count), and tests and benchmarks reach the
package through its public names only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "odegan_kernels"

# Lower layers never import higher ones. graphs, distributed and inductor are generic mechanisms (capture a
# callable, average a buffer, set up torch.compile) that the stepper and the engines use, so they sit below them;
# the closure contract sits below both the integrator (ode) and the game, which know nothing of each other; the
# models are built for the game's conventions.
LAYERS = [
    {"ops", "files"},
    {"flat"},
    {"graphs", "distributed", "inductor"},
    {"contract"},
    {"game", "ode"},
    {"models"},
    {"data", "metrics", "classifier"},
    {"problems"},
    {"train"},
    {"study"},
    {"cli", "__main__"},
]
MAX_LINES = 600


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - (node.level - 1)]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from mod import name``, the module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = package_modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(name: str) -> int:
    t = top(name)
    for i, group in enumerate(LAYERS):
        if t in group:
            return i
    raise AssertionError(f"module {name} is in no layer of tests/test_layout.py's LAYERS: place it")


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_imports_flow_one_way():
    bad = []
    for m, deps in graph().items():
        if m == "odegan_kernels":
            continue  # the top-level namespace re-exports every layer
        for d in deps:
            if d != "odegan_kernels" and layer(d) > layer(m):
                bad.append(f"{m} imports {d}")
            if d == "odegan_kernels":
                bad.append(f"{m} imports the top-level package (import the module that defines the name)")
    assert not bad, "imports against the layer order: " + "; ".join(sorted(bad))


def test_the_checker_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "odegan_kernels"
    (pkg / "ops").mkdir(parents=True)
    f = pkg / "ops" / "x.py"
    f.write_text("def f():\n    from ..train import loop\n")
    known = {"odegan_kernels.ops.x", "odegan_kernels.train", "odegan_kernels.train.loop"}
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert imports_of(f, module_name(f), known) == {"odegan_kernels.train.loop"}
    finally:
        ROOT = old


def test_no_module_passes_the_ceiling():
    sizes = {m: len(p.read_text().splitlines()) for m, p in package_modules().items()}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


def test_the_game_and_the_integrator_do_not_know_each_other():
    """The stepper drives any closure through the contract alone; the game answers one without the integrator."""
    g = graph()
    crossing = [
        f"{m} imports {d}"
        for m, deps in g.items()
        for d in deps
        if {top(m), top(d)} == {"game", "ode"} or (top(m) == "game" and top(d) == "models")
    ]
    assert not crossing, crossing


def private_uses(path: Path) -> list[str]:
    """``obj._name`` on package objects and ``from odegan_kernels... import _name`` in a test or benchmark."""
    tree = ast.parse(path.read_text())
    external = {"torch", "np", "numpy", "triton", "tl", "mp", "dist", "os", "sys", "math", "pytest", "json"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("odegan_kernels"):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in external:
                continue
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_tests_and_benchmarks_use_public_names():
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    bad = {p.name: u for p in files if p.name != "test_layout.py" and (u := private_uses(p))}
    assert not bad, f"private names used from outside the package: {bad}"
