"""The package's layering, read from medm's source with `ast`: which modules import which, and where model kinds
are told apart (docs/concepts.md, "Model kinds and checkpoints")."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import medm

ROOT = Path(medm.__file__).parent
# Layers that open, evaluate, show or convert models: they use medm.models.checkpoint, never the training code.
NOT_TRAIN = ("medm.infer", "medm.playground", "medm.interop", "medm.eval")
# Where a model kind may be named in a comparison: the KIND registry and the kinds' own modules.
KIND_MODULES = {"medm.registry", "medm.models.kind", "medm.qwenvl.kind"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


MODULES = _modules()


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The medm modules an import statement names (`from medm.a import b` names medm.a.b when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "medm"]
    if node.level:  # relative: resolve against the importing package
        package = module if module in MODULES and (ROOT / "/".join(module.split(".")[1:]) / "__init__.py").exists() \
            else module.rpartition(".")[0]
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if target.split(".")[0] != "medm":
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return subs or [target]


def _imports(module: str, top_level_only: bool) -> set[str]:
    """medm modules `module` imports; `top_level_only`: those run at import time (not inside functions, nor
    under `if TYPE_CHECKING:`)."""
    tree = MODULES[module]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not (top_level_only and in_function):
            found.update(_imported(module, node))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and top_level_only:
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _in(module: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_modules_found():
    # The walk sees the package: the layers checked below and the checkpoint home exist.
    for name in ("medm.models.checkpoint", "medm.models.kind", "medm.qwenvl.kind", "medm.infer.generate",
                 "medm.interop.merge", "medm.train.trainer"):
        assert name in MODULES, name


@pytest.mark.parametrize("layer", NOT_TRAIN)
def test_layer_never_imports_train(layer):
    offenders = sorted(f"{m} imports {t}" for m in MODULES if _in(m, layer)
                       for t in _imports(m, top_level_only=False) if _in(t, "medm.train"))
    assert not offenders, offenders


def _kind_comparisons(tree: ast.Module) -> list[str]:
    """`x.kind == "qwen-vl"`, `kind != "medm"`, `cfg.get("kind") == ...`: a comparison of something called kind
    with a registered model kind's name."""
    kinds = {"medm", "qwen-vl"}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        texts = [ast.unparse(s) for s in sides]
        names_kind = any(t.endswith("kind") or t.endswith("kind')") or t.endswith('kind")') for t in texts)
        names_value = any(isinstance(s, ast.Constant) and s.value in kinds for s in sides)
        if names_kind and names_value:
            out.append(f"line {node.lineno}: {ast.unparse(node)}")
    return out


def test_kind_comparisons_only_in_kind_modules():
    offenders = {m: _kind_comparisons(tree) for m, tree in MODULES.items() if m not in KIND_MODULES}
    offenders = {m: found for m, found in offenders.items() if found}
    assert not offenders, offenders


def test_kind_comparison_detector_sees_a_branch():
    # The check above would catch the branches it replaced.
    tree = ast.parse('if args.kind == "qwen-vl":\n    pass\nif cfg.get("kind") != "medm":\n    pass\n')
    assert len(_kind_comparisons(tree)) == 2


def test_no_import_cycle_at_import_time():
    graph = {m: {t for t in _imports(m, top_level_only=True) if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ importing its own submodules is how a package is built, not a circle between rooms.
    graph = {m: {t for t in ts if not (t.startswith(m + ".") and (ROOT / "/".join(m.split(".")[1:]) / "__init__.py")
                                       .exists())} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]


def test_checkpoint_and_kind_modules_sit_in_no_circle_even_through_deferred_imports():
    # The circle the KIND registry broke ran infer -> train -> models -> qwenvl -> infer through imports inside
    # functions; counting those too (the registry's lazy loading of its plugins aside), none of these rooms is in one.
    rooms = ("medm.models", "medm.infer", "medm.qwenvl", "medm.interop", "medm.playground", "medm.train.checkpoint",
             "medm.train.metrics")
    graph = {m: {t for t in _imports(m, top_level_only=False) if t in MODULES and t != m and not t.startswith(m + ".")}
             for m in MODULES if m != "medm.registry"}
    reach: dict[str, set[str]] = {}

    def reachable(m: str) -> set[str]:
        if m not in reach:
            reach[m] = set()
            todo = list(graph.get(m, ()))
            while todo:
                t = todo.pop()
                if t not in reach[m]:
                    reach[m].add(t)
                    todo.extend(graph.get(t, ()))
        return reach[m]

    circles = sorted(m for m in graph if _in(m, rooms) and m in reachable(m))
    assert not circles, circles


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted: a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for t in sorted(graph.get(m, ())):
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in on_stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            group = []
            while True:
                t = stack.pop()
                on_stack.discard(t)
                group.append(t)
                if t == m:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_even_through_deferred_imports():
    # Counting imports inside functions too, no two medm modules reach each other. The one allowed circle, the
    # registry's lazy loading of its plugin folders (registry.import_folder / PLUGIN_MODULES), goes through
    # importlib, not an import statement, so this walk does not see it; a package's __init__ importing its own
    # submodules is how a package is built.
    graph = {m: {t for t in _imports(m, top_level_only=False) if t in MODULES and t != m and not t.startswith(m + ".")}
             for m in MODULES}
    assert not _cycles(graph), [" <-> ".join(c) for c in _cycles(graph)]


def test_cycle_finder_sees_a_deferred_circle():
    # The check above would catch the circles it replaced (data._dicom_series <-> data._volume_io, eval.metrics <->
    # eval.text), and leaves a chain alone.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_grep_for_kind_equals_finds_only_the_registry():
    # `grep -rn 'kind ==' medm` is how a reader looks for kind branches: stage modes (`Mode.name`) and data-check
    # problems do not answer it, so every hit is the registry's.
    hits = [f"{path.relative_to(ROOT.parent)}:{i}" for path in sorted(ROOT.rglob("*.py"))
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if "kind ==" in line and path.name != "registry.py"]
    assert not hits, hits


# Third-party packages slow or optional enough that an import inside a function may defer them (`medm --help` stays
# free of torch and numpy, tests/test_cli_main.py; a DICOM, NIfTI, parquet or plotting dependency is paid only by who
# uses it).
HEAVY = {"numpy", "PIL", "torch", "transformers", "deepspeed", "peft", "bitsandbytes", "monai", "gradio", "fastapi",
         "uvicorn", "open_clip", "timm", "SimpleITK", "nibabel", "pydicom", "datasets", "pyarrow", "matplotlib",
         "tensorboard", "rouge_score", "nltk", "huggingface_hub"}
_LOADS_TORCH = ("safetensors.torch",)  # light package, heavy submodule


def _lazy_exports() -> dict[str, dict[str, str]]:
    """Package -> {name: module} of the packages that load their names on first use (medm._lazy)."""
    out = {}
    for name, tree in MODULES.items():
        if (ROOT / "/".join(name.split(".")[1:]) / "__init__.py").exists() and "lazy_exports" in ast.unparse(tree):
            out[name] = importlib.import_module(name)._EXPORTS
    return out


LAZY = _lazy_exports()


def _loads(module: str, node: ast.Import | ast.ImportFrom) -> tuple[set[str], set[str]]:
    """(medm modules, heavy third-party packages) an import statement runs: parent packages included, and a name
    of a lazily exporting package resolved to the module that defines it."""
    internal = set(_imported(module, node))
    if isinstance(node, ast.ImportFrom) and not node.level and node.module in LAZY:
        internal |= {LAZY[node.module][a.name] for a in node.names if a.name in LAZY[node.module]}
    internal = {".".join(t.split(".")[:i]) for t in internal if t in MODULES for i in range(1, len(t.split(".")) + 1)}
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    external = {n.split(".")[0] for n in names if n.split(".")[0] != "medm" and not getattr(node, "level", 0)}
    if any(n.startswith(_LOADS_TORCH) for n in names):
        external.add("torch")
    return internal & set(MODULES), external & HEAVY


def _import_nodes(module: str):
    """(import statement, inside a function?) of `module`, `if TYPE_CHECKING:` blocks left out."""
    def visit(node: ast.AST, in_function: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner)

    yield from visit(MODULES[module], False)


def _heavy_at_import() -> dict[str, set[str]]:
    """Module -> the heavy packages importing it loads (its top-level imports, followed through medm)."""
    direct = {}
    for m in MODULES:
        internal = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")))} & set(MODULES)
        external: set[str] = set()
        for node, in_function in _import_nodes(m):
            if not in_function:
                i, e = _loads(m, node)
                internal |= i - {m}
                external |= e
        direct[m] = (internal, external)
    out = {}
    for m in MODULES:
        seen, todo, heavy = set(), [m], set()
        while todo:
            t = todo.pop()
            if t not in seen:
                seen.add(t)
                heavy |= direct[t][1]
                todo.extend(direct[t][0])
        out[m] = heavy
    return out


def _imports_inside_functions() -> list[tuple[str, int, str, set[str]]]:
    """(module, line, source line, heavy packages it defers: loaded by it but not by importing the module)."""
    heavy = _heavy_at_import()
    out = []
    for m in MODULES:
        lines = (ROOT.parent / Path(*m.split("."))).with_suffix(".py").read_text(encoding="utf-8").splitlines() \
            if not (ROOT.parent / Path(*m.split("."))).is_dir() \
            else (ROOT.parent / Path(*m.split(".")) / "__init__.py").read_text(encoding="utf-8").splitlines()
        for node, in_function in _import_nodes(m):
            if in_function:
                internal, external = _loads(m, node)
                loads = external.union(*(heavy[t] for t in internal))
                out.append((m, node.lineno, lines[node.lineno - 1], loads - heavy[m]))
    return out


def test_imports_inside_functions_defer_a_heavy_package_and_say_which():
    # An import inside a function hides the layering (the circles above hid that way); one is kept only where it
    # defers a heavy or optional package the module does not load anyway, and its line says which.
    found = _imports_inside_functions()
    assert found, "the walk sees the deferred imports (torch in medm.cli's commands)"
    needless = [f"{m}:{line} {text.strip()}" for m, line, text, defers in found if not defers]
    assert not needless, needless
    unsaid = [f"{m}:{line} {text.strip()} (defers {', '.join(sorted(defers))})" for m, line, text, defers in found
              if not any(f"# defers {p}" in text or f", {p}" in text.partition("# defers")[2] for p in defers)]
    assert not unsaid, unsaid


def test_deferral_check_sees_a_needless_deferred_import():
    # medm.data.cli defers medm.data._media (torch); medm.config is light, so deferring it would be needless.
    heavy = _heavy_at_import()
    assert "torch" in heavy["medm.data._media"] and "torch" not in heavy["medm.data.cli"]
    node = ast.parse("from medm.config import ConfigError").body[0]
    internal, external = _loads("medm.data.cli", node)
    assert internal and not external and not set().union(*(heavy[t] for t in internal)) - heavy["medm.data.cli"]
