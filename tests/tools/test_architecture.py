"""The layering rules, read from the source with ``ast`` (function-level imports included):
core (``ntm/*.py``) imports only torch, numpy, safetensors and the standard library; the training
layer (``ntm/train``) adds tqdm; neither imports inside a function nor from the tools layer; the
module graph of core and training has no cycle; no module imports another's private name."""
import ast
import sys
from pathlib import Path

import pytest

import ntm

ROOT = Path(__file__).resolve().parents[2] / "ntm"
ALLOWED = {"core": {"torch", "numpy", "safetensors"}, "train": {"torch", "numpy", "safetensors", "tqdm"}}
TOOL_DEPENDENCIES = {"typer", "matplotlib", "torchmetrics", "tqdm", "PIL"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "train":
        return "train"
    if len(parts) > 1 and parts[1] in ("cli", "bench", "tools", "__main__"):
        return "tools"
    return "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(module: str, source: str, is_package: bool) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, names, inside a function?, line) of every import in a module's source."""
    tree = ast.parse(source)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, [], in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                names = [a.name for a in child.names]
                if child.module is None:  # `from . import x`: each name is a module
                    for n in names:
                        found.append((f"{target}.{n}", [], in_function, child.lineno))
                else:
                    found.append((target, names, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def private_attribute_uses(source: str) -> list[str]:
    """``alias._name`` where ``alias`` is a module imported by ``import ... as alias`` or ``from . import alias``."""
    tree = ast.parse(source)
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is None:
            aliases |= {a.asname or a.name for a in node.names}
    return [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in aliases and n.attr.startswith("_")
            and not n.attr.startswith("__")]


def graph() -> dict[str, list[tuple[str, list[str], bool, int]]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        out[name] = imports(name, path.read_text(), path.name == "__init__.py")
    return out


def resolve_module(target: str, modules: set[str]) -> str | None:
    """The project module an import names (``ntm.x.y`` may be a name inside module ``ntm.x``)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def violations(g: dict) -> list[str]:
    modules = set(g)
    problems = []
    for mod, imps in g.items():
        layer = layer_of(mod)
        for target, names, in_function, line in imps:
            top = target.split(".")[0]
            if top == "ntm":
                dep = resolve_module(target, modules)
                if dep is None:
                    problems.append(f"{mod}:{line} imports unknown {target}")
                    continue
                order = {"core": 0, "train": 1, "tools": 2}
                if order[layer_of(dep)] > order[layer]:
                    problems.append(f"{mod}:{line} ({layer}) imports {dep} ({layer_of(dep)})")
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    problems.append(f"{mod}:{line} imports private {', '.join(private)} from {target}")
            elif layer in ALLOWED and top not in ALLOWED[layer] and top not in sys.stdlib_module_names \
                    and top != "__future__":
                problems.append(f"{mod}:{line} ({layer}) imports {top}")
            if layer in ALLOWED and in_function:
                problems.append(f"{mod}:{line} imports {target} inside a function")
    return problems


def cycles(g: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import) among core + train."""
    modules = {m for m in g if layer_of(m) != "tools"}
    edges = {m: {d for t, *_ in g[m] if (d := resolve_module(t, set(g))) in modules and d != m} for m in modules}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            strong(v)
    return comps


def test_layers_point_down_and_use_only_their_dependencies():
    assert violations(graph()) == []


def test_core_and_training_have_no_import_cycle():
    assert cycles(graph()) == []


def test_core_never_imports_a_tool_dependency():
    g = graph()
    core_deps = {t.split(".")[0] for m, imps in g.items() if layer_of(m) == "core" for t, *_ in imps}
    assert not core_deps & TOOL_DEPENDENCIES


@pytest.mark.parametrize("module,source,expected", [
    ("ntm.model", "import typer\n", "imports typer"),
    ("ntm.model", "def f():\n    from .data import to_tokens\n", "inside a function"),
    ("ntm.model", "from .cli import main\n", "imports ntm.cli"),
    ("ntm.train.loop", "from ..data import _helper\n", "private _helper"),
])
def test_the_checker_catches_each_kind_of_violation(module, source, expected):
    g = graph()
    g[module] = imports(module, source, False)
    assert any(expected in p for p in violations(g))


def test_no_private_module_attribute_is_used_across_modules():
    allowed = {"torch._foreach_lerp_"}  # a public-by-use torch kernel (no public name exists)
    found = {f"{p.relative_to(ROOT.parent)}: {use}" for p in ROOT.rglob("*.py")
             for use in private_attribute_uses(p.read_text()) if use not in allowed}
    assert not found
    assert private_attribute_uses("import ntm.train.loop as loop\nloop._StopFlag()\n") == ["loop._StopFlag"]


def test_the_checker_finds_a_cycle():
    g = graph()
    g["ntm.trajectory"] = g["ntm.trajectory"] + imports("ntm.trajectory", "from .model import NTM\n", False)
    assert any("ntm.model" in c and "ntm.trajectory" in c for c in cycles(g))


def test_the_package_version_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # the standard library's from Python 3.11
    declared = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["version"]
    assert ntm.__version__ == declared
