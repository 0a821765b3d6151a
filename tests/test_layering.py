"""The architecture as a test: every ``slimgpt.*`` import points to the same layer or a lower one.

Layers (docs/architecture.md): a module may import only from its own layer or lower ones; the L6
packages (evaluation, export, finetune) import only L0-L2, never each other or a driver; nothing imports
the package ``slimgpt`` itself; function-level ``slimgpt`` imports only in the CLI (start-up time); no
module imports another module's private names; no cycles. Function-level imports of other packages
(optional extras: lm_eval, peft, gguf, matplotlib, datasets) are not checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "slimgpt"

# (module prefix, layer); the longest matching prefix decides.
LAYERS = {
    "slimgpt.errors": 0, "slimgpt._util": 0, "slimgpt._util.collectives": 0,
    "slimgpt.solver": 1,
    "slimgpt.models": 2, "slimgpt.config": 2, "slimgpt.report": 2, "slimgpt.saving": 2, "slimgpt.data": 2,
    "slimgpt.corpus": 2,
    "slimgpt.layerwise": 3, "slimgpt.layerwise.distributed": 3,
    "slimgpt.methods": 4,
    "slimgpt.prune": 5, "slimgpt.streaming": 5, "slimgpt.preflight": 5,
    "slimgpt.evaluation": 6, "slimgpt.export": 6, "slimgpt.finetune": 6,
    "slimgpt.cli": 7, "slimgpt.__main__": 7,
    "slimgpt": 8,  # the package's public API imports everything
}
INDEPENDENT = ("slimgpt.evaluation", "slimgpt.export", "slimgpt.finetune")  # L6: L0-L2 only, not each other


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer: give it one in tests/test_layering.py and docs/architecture.md")
    return LAYERS[max(matches, key=len)]


def package_of(module: str) -> str:
    return next((p for p in INDEPENDENT if module == p or module.startswith(p + ".")), module)


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    package = base if MODULES[module].name == "__init__.py" else base[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, bool, int]]:
    """(imported module, imported name or None, inside a function, line) for every slimgpt import."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, str | None, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, None, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(module, child)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub, None, in_function, child.lineno) if sub in MODULES
                                 else (base, a.name, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return [f for f in found if f[0] == "slimgpt" or f[0].startswith("slimgpt.")]


def owner(target: str) -> str:
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


EDGES = {m: [(owner(t), name, inside, line) for t, name, inside, line in imports(m)] for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = layer_of(module)
    for target, name, inside, line in EDGES[module]:
        where = f"{MODULES[module].relative_to(ROOT.parent)}:{line}"
        if target == "slimgpt" and module != "slimgpt":
            raise AssertionError(f"{where} imports the package slimgpt itself ({name}): import the module instead")
        if target == module or target.startswith(module + "."):
            continue  # a package importing its own submodules
        there = layer_of(target)
        assert there <= here, f"{where}: {module} (L{here}) imports {target} (L{there}), a higher layer"
        if package_of(module) in INDEPENDENT and package_of(target) != package_of(module):
            assert there <= 2, f"{where}: {module} may import only L0-L2, not {target} (L{there})"
        assert not inside or here >= 7, f"{where}: {module} imports {target} inside a function"
        assert not (name and name.startswith("_") and not name.startswith("__")), (
            f"{where}: {module} imports the private name {target}.{name}")


def test_no_import_cycles() -> None:
    graph = {m: {t for t, *_ in EDGES[m] if t != m and not t.startswith(m + ".") and not m.startswith(t + ".")}
             for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_catches_an_upward_import() -> None:
    """The rule itself: a solver module importing a method would be reported."""
    assert layer_of("slimgpt.solver.obs") < layer_of("slimgpt.methods.slimgpt")
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("elsewhere.module")
