"""The source tree shows the data path: a module imports only its own stage or earlier ones, passes never import
each other, and module-level imports form no circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# in data-path order; a module may import from its own stage and the ones above it
STAGES = [
    ("common", ("fxcompress", "fxcompress.errors", "fxcompress.progress", "fxcompress.text", "fxcompress.platform")),
    ("graph", ("fxcompress.graph",)),
    ("models", ("fxcompress.models",)),
    ("ops", ("fxcompress.ops",)),
    ("recipe", ("fxcompress.recipe",)),
    ("algorithms", ("fxcompress.algorithms",)),
    ("passes", ("fxcompress.passes",)),
    ("export", ("fxcompress.export",)),
    ("checker", ("fxcompress.checker",)),
    ("api", ("fxcompress.api",)),
    ("planner", ("fxcompress.planner",)),
    ("llm", ("fxcompress.llm",)),
    ("tools", ("fxcompress.bench", "fxcompress.cli", "fxcompress.__main__")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "fxcompress").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for folder in ("passes", "models"):
        for path in (ROOT / folder).glob("*.py"):
            name = f"fxcompress.{folder}" if path.stem == "__init__" else f"fxcompress.{folder}.{path.stem}"
            out[name] = path
    return out


def _stage(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or (prefix != "fxcompress" and module.startswith(prefix + ".")):
                best = index
    assert best is not None, f"{module} belongs to no stage: add it to STAGES"
    return best


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fxcompress")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxcompress"):
            found |= {f"{node.module}.{a.name}" for a in node.names}  # resolved to the module part below
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_import_points_to_the_same_or_an_earlier_stage():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        for imported in _imports(path, top_level_only=False):
            target = _resolve(imported, modules)
            if _stage(target) > _stage(module):
                wrong.append(f"{module} ({STAGES[_stage(module)][0]}) imports {target} ({STAGES[_stage(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_no_pass_imports_another_pass():
    modules = _modules()
    passes = {m for m in modules if m.startswith("fxcompress.passes.")}
    wrong = [
        f"{m} imports {_resolve(i, modules)}"
        for m in passes
        for i in _imports(modules[m], False)
        if _resolve(i, modules) in passes - {m}
    ]
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_have_no_circle():
    modules = _modules()
    graph = {m: {_resolve(i, modules) for i in _imports(p, top_level_only=True)} - {m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_stage_table_knows_every_module():
    for module in _modules():
        _stage(module)
