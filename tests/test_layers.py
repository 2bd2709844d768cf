"""The package's layers, read statically from every module's imports (``ast``): imports point
down the layers, no module imports another in a cycle, and no module reaches for another
package's underscore names (bench/ included). Function-level imports count like any other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "promptbake"

# Bottom up; a module may import its own layer and those below. The first name of a module's
# path inside promptbake decides its layer (promptbake.export.graph is "export").
LAYERS = [
    {"kernels", "ops", "nn", "_C"},  # kernels (Triton, C++) behind one dispatch; their modules
    {"files", "formatting", "plotting", "versions", "stats"},  # writes, printing, figures, tests
    {"models", "contexts", "framing", "modeling"},  # inputs, and the model as promptbake uses it
    {"decoding"},  # sampling and generation primitives
    {"trajectories", "config", "distributed"},  # distributed: ranks and their sums
    {"artifact", "train", "mc_kl"},  # a bake on disk; the training steps; Monte Carlo KL
    {"bake", "generated", "tasks", "reprompt", "forgetting", "persona", "drift", "tools",
     "lm_eval_adapter"},
    {"orchestrate", "engine"},  # stacking, stopping rules, pursuit, sequential, the engine
    {"export", "compress"},
    {"report"},
    {"pipeline"},  # a pipeline file: the engine, then report and export stages
    {"cli", "__main__"},  # python -m promptbake
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package (scripts shipped among the data files are not modules)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "data" not in p.relative_to(PACKAGE).parts}


MODULES = package_modules()


def imports(path: Path, name: str | None) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, at any depth;
    relative imports resolved against ``name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + (
                    1 if path.name == "__init__.py" else 0)]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def targets(module: str, names: list[str]) -> list[str]:
    """The promptbake modules an import reaches: ``from promptbake.x import y`` reaches the
    submodule promptbake.x.y when there is one, else promptbake.x."""
    if not module.startswith("promptbake"):
        return []
    reached = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    if len(reached) < len(names) or not names:
        reached.append(module)
    return reached


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        edges[name] = {t for module, names, _ in imports(path, name)
                       for t in targets(module, names) if t != name and t in MODULES}
    return edges


def test_every_module_has_a_layer():
    missing = sorted({layer(m) for m in MODULES if layer(m) is not None} - set(RANK))
    assert missing == [], f"add these to LAYERS in tests/test_layers.py: {missing}"


def test_imports_point_down_the_layers():
    upward = []
    for name, path in MODULES.items():
        if layer(name) is None:
            continue  # promptbake/__init__.py gathers the public API from every layer
        for module, names, line in imports(path, name):
            for target in targets(module, names):
                there = layer(target)
                if there is not None and RANK[there] > RANK[layer(name)]:
                    upward.append(f"{path.relative_to(ROOT)}:{line} {name} -> {target}")
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules is how its public names are gathered; a submodule
    # importing a sibling through the package is not a cycle of code.
    real = [c for c in cycles if not all(
        a.startswith(b + ".") or b.startswith(a + ".")
        for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert real == []


def private(module: str, names: list[str], importer: str) -> list[str]:
    """The underscore names an import takes from outside the importer's own package."""
    if not module.startswith("promptbake"):
        return []
    own = importer.rsplit(".", 1)[0] if importer in MODULES and not MODULES[importer].name \
        == "__init__.py" else importer
    found = []
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            if ".".join(parts[:i]) != own:
                found.append(module)
            break
    found += [f"{module}.{n}" for n in names
              if n.startswith("_") and not n.startswith("__") and module != own]
    return found


@pytest.mark.parametrize("where", ["python/promptbake", "bench"])
def test_no_module_imports_another_modules_underscore_names(where):
    bad = []
    for path in sorted((ROOT / where).rglob("*.py")):
        name = module_name(path) if where != "bench" else f"bench.{path.stem}"
        for module, names, line in imports(path, name):
            for what in private(module, names, name):
                if what != "promptbake._C":  # the compiled core, loaded by ops' dispatch only
                    bad.append(f"{path.relative_to(ROOT)}:{line} {what}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {alias.asname or alias.name.split(".")[-1]
                   for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in node.names
                   if (getattr(node, "module", None) or alias.name).startswith("promptbake")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert bad == []


def test_the_checks_can_fail(tmp_path):
    """The readers above see what they should: an upward import, a cycle, a private name."""
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom promptbake.cli import main\n"
                      "def f():\n    from promptbake.ops._dispatch import select\n")
    found = imports(source, "promptbake.files")
    assert ("promptbake.cli", ["main"], 2) in found
    assert ("promptbake.ops._dispatch", ["select"], 4) in found
    assert RANK[layer("promptbake.cli")] > RANK[layer("promptbake.files")]
    assert private("promptbake.ops._dispatch", ["select"], "promptbake.files") == \
        ["promptbake.ops._dispatch"]
    assert private("promptbake.ops._dispatch", ["select"], "promptbake.ops.divergence") == []
    assert private("promptbake.artifact", ["_check_files"], "promptbake.bake") == \
        ["promptbake.artifact._check_files"]
