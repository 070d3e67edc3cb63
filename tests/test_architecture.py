"""The package's layering, read from the source: no import cycles, no private names across modules, DOLFINx in
``solver/fem.py`` only, and a flow kind is one module plus one registry line."""

import ast
from pathlib import Path

from solver import flows

SOLVER = Path(__file__).resolve().parent.parent / "solver"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SOLVER.rglob("*.py"):
        name = ".".join(path.relative_to(SOLVER.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """``(imported module, imported name or '')`` for every import of the module, resolved to package modules."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full, "") if full in mods else (base, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _ in _imports(m, path, mods):
            # a module may use its own package's __init__ (the registry, __version__): that is not a layer above
            if target in mods and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    """The check can fail: a planted two-module cycle and a three-module cycle are found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_in_the_package():
    assert _cycles(_graph()) == []


def test_no_module_imports_a_private_name_of_another():
    mods = _modules()
    offenders = [(m, f"{target}.{name}") for m, path in mods.items() for target, name in _imports(m, path, mods)
                 if name.startswith("_") and not name.startswith("__") and target.startswith("solver")]
    assert offenders == []


def test_no_module_uses_a_private_attribute_of_another_module():
    """``module._name`` where ``module`` was imported from the package (e.g. ``flows._evaluate_checked``)."""
    mods = _modules()
    offenders = []
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("solver")):
                bound |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                bound |= {alias.asname or alias.name for alias in node.names if alias.name.startswith("solver")}
        offenders += [(m, f"{node.value.id}.{node.attr}") for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in bound and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert offenders == []


def test_dolfinx_is_imported_in_fem_only():
    mods = _modules()
    users = sorted(m for m, path in mods.items()
                   if any(t.split(".")[0] in ("dolfinx", "ufl", "basix", "ffcx") for t, _ in _imports(m, path, mods)))
    assert users == ["solver.fem"]


def test_every_flow_kind_is_one_module_with_one_registry_entry():
    """Each registered kind lives in its own module ``solver/flows/<kind>.py`` and is named by its ``kind``."""
    for kind, cls in flows.KINDS.items():
        assert cls.kind == kind
        assert cls.__module__ == f"solver.flows.{kind}", (kind, cls.__module__)
    registry = (SOLVER / "flows" / "__init__.py").read_text()
    assert registry.count("KINDS: dict") == 1
