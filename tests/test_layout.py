"""The package's import graph: layers depend only downward, no circle, no private name across packages.

Layers (docs/architecture.md), lowest first; a module may import its own package and lower layers:

    core (0)  ->  kernels, files (1; peers, neither imports the other)  ->  integrations (2; each engine
    its own package, none imports another)  ->  lifecycle (3)  ->  the public facade fastpatch/__init__.py
    (3.5)  ->  app (4: the CLI and demos, clients of the public API)  ->  fastpatch/__main__.py (5)

Every import counts, the ones inside functions too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastpatch"
LAYERS = {"core": 0, "kernels": 1, "files": 1, "integrations": 2, "lifecycle": 3, "app": 4}
FACADE = 3.5
ENTRY = 5


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict):
    """(target module, imported names) for every import of a fastpatch module, resolved to modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastpatch":
                    yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastpatch":
                continue
            names = tuple(a.name for a in node.names)
            plain = []
            for n in names:  # "from pkg import module" is an edge to the module itself
                if f"{target}.{n}" in modules:
                    yield f"{target}.{n}", ()
                else:
                    plain.append(n)
            if plain or not names:
                yield target, tuple(plain)


def _owner(module: str) -> tuple:
    """(layer rank, the package that owns it): integrations are owned per engine."""
    parts = module.split(".")
    if module == "fastpatch.__main__":
        return ENTRY, module
    if len(parts) < 2 or parts[1] not in LAYERS:
        return FACADE, "fastpatch"
    if parts[1] == "integrations" and len(parts) > 2:
        return LAYERS["integrations"], ".".join(parts[:3])
    return LAYERS[parts[1]], ".".join(parts[:2])


def _graph():
    modules = _modules()
    edges = {}
    names = {}
    for name, path in modules.items():
        for target, imported in _imports(name, path, modules):
            if target == name:
                continue
            edges.setdefault(name, set()).add(target)
            names.setdefault((name, target), set()).update(imported)
    return modules, edges, names


def test_the_graph_sees_the_package():
    modules, edges, _ = _graph()
    assert "fastpatch.core.patches" in modules and "fastpatch.integrations.hf.api" in modules
    assert "fastpatch.kernels.backends" in edges["fastpatch.kernels.ops"]
    assert "fastpatch.integrations.hf.engine" in edges["fastpatch.integrations.hf.fused"]


def test_no_upward_or_sideways_import():
    _, edges, _ = _graph()
    bad = []
    for src, targets in edges.items():
        rank, owner = _owner(src)
        for dst in targets:
            drank, downer = _owner(dst)
            if downer == owner:
                continue
            if drank >= rank:
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports that go up or sideways between layers:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    _, edges, _ = _graph()
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not comps, f"import circles: {comps}"


def test_no_private_name_across_packages():
    _, _, names = _graph()
    bad = []
    for (src, dst), imported in names.items():
        if _owner(src)[1] == _owner(dst)[1]:
            continue
        bad += [f"{src} imports {n} from {dst}" for n in imported if n.startswith("_") and not n.endswith("__")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("src,dst,expect_bad", [
    ("fastpatch.core.bank", "fastpatch.kernels.ops", True),
    ("fastpatch.kernels.ops", "fastpatch.files.patch_file", True),
    ("fastpatch.integrations.hf.api", "fastpatch.integrations.vllm.plugin", True),
    ("fastpatch.lifecycle.registry", "fastpatch.integrations.hf.api", False),
])
def test_the_rule_itself(src, dst, expect_bad):
    """The layer rule flags what it should (guards the checker against a silent change)."""
    (r1, o1), (r2, o2) = _owner(src), _owner(dst)
    assert (o1 != o2 and r2 >= r1) == expect_bad
