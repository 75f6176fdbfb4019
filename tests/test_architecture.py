"""The layering the README's layout promises, read from the source: the reward-model core is
shared by the service and the trainer and imports neither; the service and the trainer never
import each other; the client stands alone; no module imports another's private names; and the
import graph between modules has no circle (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "reward_core", "service", "trainer")
TOP_MODULES = ("reward_cli",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    for name in TOP_MODULES:
        found[name] = REPO / f"{name}.py"
    return found


SOURCES = _sources()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement, lazy ones included."""
    path = SOURCES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            names = [a.name for a in node.names]
            # ``from package import submodule`` imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in SOURCES]
            found += [(s, []) for s in subs] or [(target, names)]
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module in SOURCES:
        for target, _ in _imports(module):
            while target and target not in SOURCES:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges[module].add(target)
    return edges


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_core_imports_neither_the_service_nor_the_trainer():
    edges = _project_edges()
    wrong = sorted((m, t) for m in edges if _top(m) == "reward_core" for t in edges[m] if _top(t) in ("service", "trainer", "client"))
    assert wrong == []


def test_service_and_trainer_never_import_each_other():
    edges = _project_edges()
    wrong = sorted(
        (m, t) for m in edges for t in edges[m]
        if {_top(m), _top(t)} == {"service", "trainer"}
    )
    assert wrong == []


def test_the_client_imports_only_itself_and_no_torch():
    for module in (m for m in SOURCES if _top(m) == "client"):
        for target, _ in _imports(module):
            assert _top(target) not in ("service", "trainer", "reward_core", "torch", "transformers"), (module, target)


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for module in SOURCES:
        for target, names in _imports(module):
            if target in SOURCES and target != module:
                wrong += [(module, target, n) for n in names if n.startswith("_") and not n.startswith("__")]
    assert wrong == []


def test_the_import_graph_between_modules_has_no_circle():
    edges = _project_edges()
    # A package's __init__ importing its own submodules is how a package exposes them, not a circle.
    for module in edges:
        edges[module] = {t for t in edges[module] if not (SOURCES[module].name == "__init__.py" and t.startswith(module + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert circles == []


def test_every_name_imported_from_a_project_module_exists():
    # Lazy imports run only on their code path: a name that moved would otherwise be found by
    # the first user of that path (as `from .evaluate import pair_outcomes` was, after evaluate
    # became a package).
    import importlib

    missing = []
    for module in SOURCES:
        for target, names in _imports(module):
            if target not in SOURCES:
                continue
            imported = importlib.import_module(target)
            missing += [(module, target, n) for n in names if n != "*" and not hasattr(imported, n)
                        and f"{target}.{n}" not in SOURCES]
    assert missing == []
