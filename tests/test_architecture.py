"""The shape of the library: no import cycles (lazy imports included), every module importable on its
own, no function over 80 lines, and the single owners of run folders and prediction files."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pipeline"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every pipeline module ``name`` imports, at the top or inside a function (lazily)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for b in ast.walk(tree)
        if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
        for n in ast.walk(b)
    }  # annotations only: never executed
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in MODULES and c != name}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_import_graph_has_no_cycle():
    # the package's own __init__ only configures logging; edges into it are not dependencies
    graph = {n: _imports(n, p) - {"pipeline"} for n, p in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_fold_jobs_imports_the_trainer_never_the_driver():
    assert "pipeline.train.cv" not in _imports("pipeline.train.executors", MODULES["pipeline.train.executors"])
    assert "pipeline.train.trainer" in _imports("pipeline.train.executors", MODULES["pipeline.train.executors"])
    assert "pipeline.train.cv" not in _imports("pipeline.train.trainer", MODULES["pipeline.train.trainer"])


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of pipeline modules (third-party ones stay loaded)."""
    code = (
        "import importlib, sys\n"
        f"names = {sorted(n for n in MODULES if n not in ('pipeline', 'pipeline.__main__'))!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'pipeline' or k.startswith('pipeline.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PKG.parent,
        capture_output=True,
        text=True,
        env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_over_80_lines(name):
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})"
        for n in ast.walk(ast.parse(MODULES[name].read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: " + ", ".join(long)


def _source_lines(pattern: str) -> list[str]:
    hits = []
    for name, path in MODULES.items():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern in line and not line.lstrip().startswith("#"):
                hits.append(f"{name}:{i}")
    return hits


def test_seed_list_is_computed_in_one_place():
    assert len(_source_lines("seeds or [")) <= 1, _source_lines("seeds or [")


# ---- the package stack: imports point down ---------------------------------------------------

# bottom to top; a module may import its own package and the ones below, never one above
STACK = [
    "core",
    "config",
    "tasks",
    "models",
    "data",
    "runs",
    "train",
    "plan",
    "tune",
    "predict",
    "evaluate",
    "ensemble",
    "stages",
    "zoo",
    "cli",
    "__main__",
]
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def _rank(module: str) -> int:
    parts = module.split(".")
    return -1 if len(parts) == 1 else STACK.index(parts[1])


def test_every_module_is_in_a_package_of_the_stack():
    stray = [n for n in MODULES if n != "pipeline" and n.split(".")[1] not in STACK]
    assert not stray, f"modules outside the stack {STACK}: {stray}"


def test_imports_point_down_the_stack():
    """Lazy imports and package re-exports included; only ``if TYPE_CHECKING:`` imports are exempt."""
    up = [
        f"{n} -> {m}"
        for n, p in MODULES.items()
        if n != "pipeline"
        for m in _imports(n, p) - {"pipeline"}
        if _rank(m) > _rank(n)
    ]
    assert not up, "imports up the stack:\n" + "\n".join(up)


def test_the_stack_check_can_fail():
    assert _rank("pipeline.train.cv") > _rank("pipeline.runs.layout") > _rank("pipeline.config.schema")
    assert _rank("pipeline.cli") == STACK.index("cli")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_classes_stay_small(name):
    text = MODULES[name].read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{name}: {text.count(chr(10))} lines"
    big = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_CLASS_LINES
    ]
    assert not big, f"{name}: " + ", ".join(big)


def test_import_pipeline_adds_only_a_null_handler():
    code = (
        "import logging, pipeline, pipeline.cli, pipeline.train.cv\n"
        "hs = logging.getLogger('pipeline').handlers\n"
        "assert all(type(h) is logging.NullHandler for h in hs), hs\n"
        "assert logging.getLogger('pipeline').propagate and not logging.getLogger().handlers\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PKG.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr


def test_every_lazy_registry_entry_resolves():
    """Each built-in ``"module:attr"`` entry names something that exists (imported here, in a fresh process)."""
    code = (
        "from pipeline.config import registries as r\n"
        "from pipeline.core.metrics import METRICS\n"
        "regs = [v for v in vars(r).values() if type(v).__name__ == 'Registry'] + [METRICS]\n"
        "paths = [(reg.kind, n, p) for reg in regs for n, p in reg.lazy_paths().items()]\n"
        "assert len(paths) > 30, paths\n"
        "for reg in regs:\n"
        "    for name, _ in reg.items():\n"
        "        pass\n"
        "print(len(paths))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PKG.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
