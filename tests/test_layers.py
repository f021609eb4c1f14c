"""The imports run one way: pages -> dashboard -> cache_builder, with no cycle, as the README's picture shows.

Every import counts, those inside functions too: a cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cache_builder", "dashboard", "pages")  # each may import only the ones before it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "app.py", *(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))]
    return {module_name(p): p for p in files}


def imported(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere in its body (`from a import b` counts a.b when it is one)."""
    found = set()
    inside = path.is_relative_to(ROOT)
    package = "" if not inside else module_name(path) if path.name == "__init__.py" else \
        module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, set(modules)) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)  # app.py sits on top


def test_every_import_points_down_the_layers(graph):
    upward = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))
    assert not upward, upward


def test_no_module_imports_itself_through_others(graph):
    """Depth-first search for a back edge; the message names the cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_only_the_ui_layer_imports_streamlit():
    modules = project_modules()
    allowed = ("app", "pages.", "dashboard.ui")
    offenders = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        uses = any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
            (a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] in ("streamlit",
                                                                                        "streamlit_drawable_canvas")
            for a in n.names) for n in ast.walk(tree))
        if uses and not name.startswith(allowed):
            offenders.append(name)
    assert not offenders, offenders


def test_the_cache_contract_does_not_need_torch():
    tree = ast.parse((ROOT / "cache_builder" / "cache_format.py").read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names


def test_the_checker_sees_a_hidden_upward_import(tmp_path):
    """The test above must be able to fail: an import inside a function body is found."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from dashboard.search import SearchRequest\n    import dashboard.geometry\n")
    assert imported(module, {"dashboard.search", "dashboard.geometry"}) == {"dashboard.search", "dashboard.geometry"}
