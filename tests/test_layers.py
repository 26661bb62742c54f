"""Imports flow one way: each module imports only from lower layers or from its own package,
and no two modules import each other, directly or round a circle.

Layers, bottom to top (docs/architecture.md draws them):
  0 core          settings, logs, Kafka clients, record contracts, topics, dead letters
  1 ops, state    metrics and operations helpers; checkpoint protocol and stores
  2 neural models the text encoder, UIF fusion and its CTR backbones (the fusion worker's)
  3 workers       streams (UBSP), llm_workers (UIL), fusion (UIF vectors)
  4 ranker side   models: rankers, training, offline evaluation (they replay the workers' steps)
  5 benchmarks
  6 liber         the command line, demo, chaos, status
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # module prefix -> layer; the longest matching prefix wins
    "core": 0,
    "ops": 1, "state": 1,
    "models.layers": 2, "models.text_encoder": 2, "models.uif": 2, "models.adaptor": 2,
    "models.fusion": 2, "models.din": 2, "models.dcnv2": 2, "models.artifact": 2,
    "streams": 3, "llm_workers": 3, "fusion": 3,
    "models": 4,
    "benchmarks": 5,
    "liber": 6,
}
PACKAGES = sorted({prefix.split(".")[0] for prefix in LAYERS})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def layer(module: str) -> int:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(matches, key=len)]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `module` imports (at any depth in the file)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import module` imports the module; `from pkg import name`, the package
            names = subs if all(sub in known for sub in subs) else [base] + subs
        else:
            continue
        for name in names:
            parts = name.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != module:
                found.add(".".join(parts))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS)] == []


def test_imports_point_down_or_within_the_package():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            same_package = module.split(".")[0] == target.split(".")[0] and layer(module) == layer(target)
            if not same_package and layer(target) >= layer(module):
                upward.append(f"{module} (layer {layer(module)}) -> {target} (layer {layer(target)})")
    assert sorted(upward) == []


def test_no_import_circles():
    edges = {m: {t for t in ts if not t.startswith(m + ".")}  # a package's __init__ may re-export
             for m, ts in graph().items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path
                               else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert circles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk itself: an upward import in a file is found (so the tests above can fail)."""
    (tmp_path / "x.py").write_text("from liber import cli\nfrom . import logs\n")
    found = imports("core.x", tmp_path / "x.py", {"liber.cli", "core.logs"})
    assert found == {"liber.cli", "core.logs"}
    assert layer("liber.cli") > layer("core.x")
