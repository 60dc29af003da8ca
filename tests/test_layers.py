"""The package's layers: its rooms and top modules in order, each importing only from its
own layer or those below, and no module importing a module that imports it back. Function-local
imports count too: deferring an import hides a cycle from Python, not from a reader
(docs/architecture.md, "Rooms and layers")."""

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import networkx as nx

# Low to high. A name is a subpackage (the rooms data, training, evaluation, serving; policies;
# the side folders feedback, verifiers, recipes) or a module at the package's top; "" is the
# package's own __init__ (the public API, which re-exports from everywhere).
LAYERS = [
    ("core", {"errors", "types", "files", "config", "trackers", "progress", "models", "fixtures", "tiny", "tiny_look"}),
    ("data", {"data"}),
    ("training", {"training"}),
    ("agent", {"policies", "feedback", "verifiers", "turns", "loop"}),
    ("evaluation", {"evaluation"}),
    ("assembly", {"build", "run", "on_policy"}),
    ("serving", {"serving"}),
    ("commands", {"evolve", "langchain", "recipes", "cli", ""}),
]


def layer_of(module: str) -> int:
    top = module.removeprefix("selfevolve").lstrip(".").split(".")[0]
    found = [i for i, (_, names) in enumerate(LAYERS) if top in names]
    assert found, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return found[0]


def modules() -> dict[str, Path]:
    """Every module of the installed package (feedback/, verifiers/, recipes/ included)."""
    out = {}
    for package in ("selfevolve", "selfevolve.feedback", "selfevolve.verifiers", "selfevolve.recipes"):
        mod = importlib.import_module(package)  # each side folder has its own __path__ (package-dir)
        out[package] = Path(mod.__file__)
        for info in pkgutil.walk_packages(mod.__path__, package + "."):
            spec = importlib.util.find_spec(info.name)
            if spec and spec.origin and spec.origin.endswith(".py"):
                out[info.name] = Path(spec.origin)
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        g.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                if t in mods and t != name:
                    g.add_edge(name, t)
                    # importing a.b.c runs a/b/__init__ first: the packages above the target count as
                    # imported too, except those already running above the importer itself
                    own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {name}
                    for k in range(1, t.count(".")):
                        parent = t.rsplit(".", k)[0]
                        if parent in mods and parent not in own:
                            g.add_edge(name, parent)
    return g


def test_the_graph_sees_the_package():
    g = import_graph()
    assert {"selfevolve.loop", "selfevolve.recipes.score", "selfevolve.verifiers.code",
            "selfevolve.feedback.critics"} <= set(g)
    assert g.has_edge("selfevolve.recipes.score", "selfevolve.run")
    assert g.has_edge("selfevolve.policies.hf", "selfevolve.training.learner")
    assert g.has_edge("selfevolve.evolve", "selfevolve.policies")  # a submodule's package runs its __init__


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in sorted(cycles, key=len)[:5])


def test_no_layer_imports_a_higher_one():
    up = sorted((a, b) for a, b in import_graph().edges if layer_of(b) > layer_of(a))
    assert not up, "imports upward: " + "; ".join(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                                                   for a, b in up)


def test_every_module_has_a_layer_and_every_layer_names_a_module():
    mods = modules()
    for name in mods:
        layer_of(name)
    tops = {m.removeprefix("selfevolve").lstrip(".").split(".")[0] for m in mods}
    assert set().union(*(names for _, names in LAYERS)) == tops


def test_the_package_exports_resolve():
    """`selfevolve.NAME` is imported lazily from a module named by a string, which the import
    graph cannot see: every exported name must resolve."""
    import selfevolve

    for name in selfevolve.__all__:
        assert getattr(selfevolve, name) is not None, name
