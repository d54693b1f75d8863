"""The house rules of the code base, checked on its import graph and its files.

Data flows one way (`data_pipeline` -> `musenet_jax` -> `launch` -> `benchmarks`), `pallas_kernels` depends on
nothing of ours, no module-level import cycle, each Pallas backend in a file of its own, and no module above
700 lines unless its docstring says why. `python -m tests.test_layering` prints the graph (module -> the
modules of ours it imports at module level).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "musenet_jax", "pallas_kernels", "launch", "benchmarks", "configs")
# What each package may import of ours (module level).
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "data_pipeline": {"data_pipeline"},
    "musenet_jax": {"data_pipeline", "musenet_jax", "pallas_kernels"},
    "launch": {"data_pipeline", "musenet_jax", "pallas_kernels", "launch", "configs"},
    "benchmarks": {"data_pipeline", "musenet_jax", "pallas_kernels", "launch", "benchmarks", "configs"},
    "configs": {"configs"},
}
BACKENDS = {"tpu": "jax.experimental.pallas.tpu", "triton": "jax.experimental.pallas.triton",
            "mosaic_gpu": "jax.experimental.pallas.mosaic_gpu"}
MAX_LINES = 700
# A module may be longer when its docstring says why, in a line starting with this.
LONG_REASON = "Longer than 700 lines:"


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of ours."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def module_imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports at module level (function-level imports are deliberate, lazy ones)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at module level (a package's `__init__` counts as the package)."""
    ours = modules()
    return {name: {m for m in module_imports(path) if m in ours and m != name} for name, path in ours.items()}


def test_packages_import_only_what_their_layer_allows():
    bad = [f"{m} imports {dep}" for m, deps in graph().items() for dep in deps
           if dep.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, bad


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(edges[node]):
            # A package's __init__ importing its own submodules is not a cycle with them.
            if node == dep.rsplit(".", 1)[0] or dep == node.rsplit(".", 1)[0]:
                continue
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_each_pallas_backend_lives_in_its_own_file(backend):
    folder = ROOT / "pallas_kernels"
    importers = sorted(str(p.relative_to(ROOT)) for p in folder.rglob("*.py")
                       if BACKENDS[backend] in module_imports(p))
    assert importers == [f"pallas_kernels/block_sparse/{backend}.py"]


def test_modules_stay_under_700_lines_or_say_why():
    long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        if len(lines) > MAX_LINES and not any(line.startswith(LONG_REASON) for line in doc.splitlines()):
            long.append(f"{name}: {len(lines)} lines")
    assert not long, long


if __name__ == "__main__":
    for module, deps in sorted(graph().items()):
        if deps:
            print(f"{module} -> {', '.join(sorted(deps))}")
