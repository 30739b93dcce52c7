"""The package's layout (issue 23): its rooms import in one direction, no module imports itself back
through others, the runtime runs where torch cannot be imported, and backend names are compared in
backends/ only.

The import graph is read from the source (ast), not from a running interpreter: module-level and
function-level imports, `importlib.import_module` with a literal name, the backend registry's
table (backends._MODULES, imported by name) and the package's lazy table (cnpose_trt._LAZY).
Imports under `if TYPE_CHECKING:` never run (annotations are strings here) and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cnpose_trt"
BACKEND_NAMES = ("onnxruntime", "torch", "tensorrt", "openvino")

# The rooms, lowest first. A module of a room imports its own room and the rooms listed for it.
BASE = {"errors", "spec", "checks", "config", "progress", "interrupts", "cache", "shipped", "_C", "_version"}
# Old module paths kept for the README (each is the moved module itself, see the module docstrings).
SHIMS = {"decoding": "ops", "preprocess": "io", "synthetic": "io", "evaluate": "eval"}
# Old paths that `python -m` runs: their `if __name__ == "__main__":` branch runs the command from cli, as a
# package's __main__ does (and only that module: no room imports a shim, so no circle can pass through it).
SHIM_COMMANDS = {("cnpose_trt.evaluate", "cnpose_trt.cli.eval")}
ALLOWED = {
    "base": set(),
    "ops": {"base"},
    "io": {"base", "ops"},
    "nn": {"base", "ops", "io"},
    "backends": {"base", "ops", "nn"},
    "runtime": {"base", "ops", "backends"},
    "pipeline": {"base", "ops", "io", "backends", "runtime"},
    "build": {"base", "ops", "io", "nn", "backends", "runtime"},
    "batch": {"base", "ops", "io", "backends", "runtime", "pipeline"},
    "eval": {"base", "ops", "io", "backends", "runtime", "pipeline"},
    "cli": {"base", "ops", "io", "nn", "backends", "runtime", "pipeline", "build", "batch", "eval"},
    # cnpose_trt/__init__.py: the public API, bound eagerly (base, ops) or lazily by name.
    "api": {"base", "ops", "nn", "runtime", "pipeline", "build"},
}
# The places below cli that reach the build, each named by (module, function): runtime.open's build
# (open_engine: every caller that builds the engine it asks for when it is not cached goes through it).
# Nothing else may. (The backends' build steps are in the build room: see room().)
REACH_BUILD = {
    ("cnpose_trt.runtime.open", "build", "cnpose_trt.build.builder"),
}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # "module", or the qualified name of the function holding the import
    line: int
    how: str  # "import", "importlib", "registry", "lazy"


def _modules() -> dict[str, Path]:
    found = {"cnpose_trt._C": PKG / "_C.pyi"}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package(name: str) -> list[str]:
    return name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("cnpose_trt")]
    if node.level:
        pkg = _package(name)
        base = pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])
        target = ".".join(base)
    elif (node.module or "").startswith("cnpose_trt"):
        target = node.module
    else:
        return []
    out = []
    for alias in node.names:  # `from . import backends` imports a module; `from .x import f` the module x
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dict_strings(tree: ast.Module, variable: str) -> list[tuple[str, int]]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            assert isinstance(node.value, ast.Dict)
            return [(v.value, node.lineno) for v in node.value.values if isinstance(v, ast.Constant)]
    return []


def edges_of(name: str) -> list[Edge]:
    path = MODULES[name]
    if path.suffix != ".py":
        return []
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Edge] = []

    def visit(node: ast.AST, where: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for rest in child.orelse:
                    visit(rest, where, in_function)
                continue
            inner, inner_function = where, in_function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = [*where, child.name]
                inner_function = in_function or not isinstance(child, ast.ClassDef)
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                label = ".".join(where) if in_function else "module"
                out.extend(Edge(name, t, label, child.lineno, "import") for t in _targets(name, child))
            if (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                    and isinstance(child.args[0].value, str)
                    and getattr(child.func, "attr", getattr(child.func, "id", None)) == "import_module"):
                target = child.args[0].value
                if target.startswith("."):
                    target = ".".join(_package(name)) + target
                if target.startswith("cnpose_trt"):
                    out.append(Edge(name, target, ".".join(where) or "module", child.lineno, "importlib"))
            visit(child, inner, inner_function)

    visit(tree, [], False)
    if name == "cnpose_trt.backends":
        out += [Edge(name, f"cnpose_trt.backends.{m}", "get", line, "registry")
                for m, line in _dict_strings(tree, "_MODULES")]
    if name == "cnpose_trt":
        out += [Edge(name, f"cnpose_trt.{m}", "__getattr__", line, "lazy") for m, line in _dict_strings(tree, "_LAZY")]
    return out


EDGES = [e for name in MODULES for e in edges_of(name) if e.dst != e.src]


def is_build_step(name: str) -> bool:
    """cnpose_trt.backends.<name>.compiler: a backend's build step (it compiles an engine inside
    build_engine and may use build/verify), kept apart from the backend's runtime."""
    parts = name.split(".")
    return len(parts) == 4 and parts[1] == "backends" and parts[3] == "compiler"


def is_compile_door(e: Edge) -> bool:
    """A backend package's thin compile() importing its own build step: the one way from backends/ into
    the build room, taken only when build_engine calls compile(), so importing a backend never imports it."""
    return is_build_step(e.dst) and e.src == e.dst.rsplit(".", 1)[0] and e.where == "compile"


def room(name: str) -> str:
    """The room a module lives in: its subpackage's, except the backends' build steps (is_build_step),
    which are the build room's."""
    parts = name.split(".")
    if is_build_step(name):
        return "build"
    if name == "cnpose_trt":
        return "api"
    if parts[-1] == "__main__":
        return "entry"
    if len(parts) == 2 and parts[1] in BASE:
        return "base"
    if len(parts) == 2 and parts[1] in SHIMS:
        return "shim"
    if parts[1] in ALLOWED and (len(parts) > 2 or MODULES[name].name == "__init__.py"):
        return parts[1]
    raise AssertionError(f"{name} is in no room: add it to tests/test_layout.py (BASE or ALLOWED)")


def test_every_import_resolves_to_a_module():
    missing = sorted({f"{e.src}:{e.line} -> {e.dst}" for e in EDGES if e.dst not in MODULES})
    assert not missing


def test_import_direction():
    """spec/errors -> ops -> io -> nn -> backends -> runtime -> pipeline -> batch/eval -> cli; below cli,
    only the build-or-load entries (REACH_BUILD) and each backend's compile() (its own build step) reach build."""
    wrong, used = [], set()
    for e in EDGES:
        src, dst = room(e.src), room(e.dst)
        if src == dst:
            continue
        if src == "entry":  # a package's __main__ runs its own room's command, or cli's
            ok = dst == "cli" or e.dst.rsplit(".", 1)[0] == e.src.rsplit(".", 2)[0] + "." + e.src.split(".")[1]
        elif src == "shim":
            ok = dst == SHIMS[e.src.split(".")[1]] or (e.src, e.dst) in SHIM_COMMANDS
        else:
            ok = dst in ALLOWED[src]
        if not ok and is_compile_door(e):
            ok = True
        if not ok and dst == "build" and (e.src, e.where, e.dst) in REACH_BUILD:
            used.add((e.src, e.where, e.dst))
            ok = True
        if not ok:
            wrong.append(f"{e.src} ({src}) line {e.line} in {e.where} imports {e.dst} ({dst})")
    assert not wrong, "\n".join(wrong)
    assert used == REACH_BUILD, f"REACH_BUILD names imports that no longer exist: {sorted(REACH_BUILD - used)}"


def test_no_room_below_cli_imports_cli_or_a_shim():
    bad = [f"{e.src}:{e.line} -> {e.dst}" for e in EDGES
           if room(e.src) not in ("cli", "entry", "api") and (room(e.dst) in ("cli", "shim"))
           and (e.src, e.dst) not in SHIM_COMMANDS]
    assert not bad


def test_a_shim_reaches_cli_only_to_run_its_command():
    """SHIM_COMMANDS' imports exist, and each sits in the module's `if __name__ == "__main__":` branch."""
    for src, dst in SHIM_COMMANDS:
        tree = ast.parse(MODULES[src].read_text())
        mains = [n for n in tree.body if isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
                 and getattr(n.test.left, "id", None) == "__name__"]
        inside = {t for m in mains for n in ast.walk(m) if isinstance(n, (ast.Import, ast.ImportFrom))
                  for t in _targets(src, n)}
        outside = {e.dst for e in EDGES if e.src == src} - inside
        assert dst in inside and dst not in outside, (src, dst)


def _cycles(edges: list[Edge]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_circles():
    """No module reaches itself again through imports, function-level, importlib and registry ones included."""
    assert _cycles(EDGES) == []


# Inside pipeline/: the scheduler and the data know no path; the host path knows nothing of the
# device path (which builds on it); the staging ring is a leaf. Module -> pipeline modules it may import.
PIPELINE_INSIDE = {
    "results": set(), "items": {"results"}, "staging": set(), "window": {"items"},
    "host": {"items", "results"}, "gpu_stage": {"staging"},
    "device": {"host", "items", "results", "gpu_stage"}, "roots": set(),
}


def test_pipeline_paths_stay_apart():
    """pipeline/: the host path imports nothing of the device path (gpu_stage, staging, device), the
    window reaches a path only through the object it is given, the staging ring imports nothing."""
    wrong = []
    for e in EDGES:
        src, dst = e.src.split("."), e.dst.split(".")
        if src[:2] != ["cnpose_trt", "pipeline"] or dst[:2] != ["cnpose_trt", "pipeline"] or len(src) < 3:
            continue
        if src[2] in PIPELINE_INSIDE and (len(dst) < 3 or dst[2] not in PIPELINE_INSIDE[src[2]]):
            wrong.append(f"{e.src} line {e.line} imports {e.dst}")
    assert not wrong, "\n".join(wrong)
    assert set(PIPELINE_INSIDE) | {"estimator"} == {m.split(".")[2] for m in MODULES
                                                    if m.startswith("cnpose_trt.pipeline.")}


def test_the_cycle_finder_finds_a_circle():
    ring = [Edge("a", "b", "module", 1, "import"), Edge("b", "c", "f", 2, "import"),
            Edge("c", "a", "g", 3, "importlib"), Edge("c", "d", "module", 4, "import")]
    assert _cycles(ring) == [["a", "b", "c"]]


def test_the_graph_sees_function_level_and_registry_imports():
    """The scan is not blind: known imports of each kind are in the graph."""
    seen = {(e.src, e.dst, e.how) for e in EDGES}
    assert ("cnpose_trt.backends", "cnpose_trt.backends.tensorrt", "registry") in seen
    assert ("cnpose_trt.backends.tensorrt", "cnpose_trt.backends.tensorrt.compiler", "import") in seen
    assert ("cnpose_trt", "cnpose_trt.pipeline.estimator", "lazy") in seen
    assert any(e.src == "cnpose_trt.runtime.open" and e.dst == "cnpose_trt.build.builder"
               and e.where == "build" for e in EDGES)


def test_the_load_options_table_is_each_backends_own():
    """backends.base.LOAD_OPTIONS (what a refusal names without importing the other backends) matches
    every backend module's LOAD_OPTIONS."""
    import importlib

    from cnpose_trt.backends import NAMES, base

    assert set(base.LOAD_OPTIONS) == set(NAMES)
    for name in NAMES:
        module = importlib.import_module(f"cnpose_trt.backends.{name}")
        assert base.LOAD_OPTIONS[name] == module.LOAD_OPTIONS, name


def test_old_module_paths_still_work():
    """The paths the README, `python -m` and the console script use are the moved modules themselves."""
    import cnpose_trt
    import cnpose_trt.decoding
    import cnpose_trt.eval.evaluate
    import cnpose_trt.evaluate
    import cnpose_trt.io.preprocess
    import cnpose_trt.io.synthetic
    import cnpose_trt.ops.decoding
    import cnpose_trt.preprocess
    import cnpose_trt.synthetic
    from cnpose_trt.batch import run as batch_run
    from cnpose_trt.batch.job import run as job_run
    from cnpose_trt.build import build_engine
    from cnpose_trt.build.builder import build_engine as built
    from cnpose_trt.cli import main
    from cnpose_trt.cli.app import main as app_main
    from cnpose_trt.cli.batch import main as batch_main
    from cnpose_trt.pipeline import PoseEstimator
    from cnpose_trt.pipeline.estimator import PoseEstimator as estimator

    assert cnpose_trt.decoding is cnpose_trt.ops.decoding
    assert cnpose_trt.preprocess is cnpose_trt.io.preprocess
    assert cnpose_trt.synthetic is cnpose_trt.io.synthetic
    assert cnpose_trt.evaluate is cnpose_trt.eval.evaluate
    assert (build_engine, PoseEstimator, main, batch_run) == (built, estimator, app_main, job_run)
    assert batch_main.__module__ == "cnpose_trt.cli.batch"  # `python -m cnpose_trt.batch` runs cli's command
    for name in cnpose_trt.__all__:
        getattr(cnpose_trt, name)


@pytest.mark.parametrize("module", ["cnpose_trt.build", "cnpose_trt.batch", "cnpose_trt.evaluate", "cnpose_trt"])
def test_python_dash_m_still_works(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")


_RUNTIME = """
import sys
sys.modules['torch'] = None
sys.modules['onnx'] = None
import numpy as np
from cnpose_trt import PoseEstimator, decode, load_engine
from cnpose_trt.io.draw import demo_image
from cnpose_trt.io.preprocess import prepare
engine = load_engine(sys.argv[1])
assert engine.backend == 'onnxruntime', engine.backend
image, box = demo_image()
crops, crop_boxes = prepare(image, np.asarray([box], np.float64))
heat = engine.infer(crops)
pose = decode(heat, engine.spec.joints, engine.spec.depth_dim, boxes=crop_boxes)
assert pose.image.shape == (1, engine.spec.joints, 3) and np.isfinite(pose.image).all(), pose.image.shape
result = PoseEstimator(sys.argv[1]).predict(image, [box])
assert result.image.shape == (1, engine.spec.joints, 3) and np.isfinite(result.image).all()
assert sys.modules['torch'] is None and sys.modules['onnx'] is None
print('ok')
"""


def test_runtime_runs_where_torch_cannot_be_imported(xs_engine_path):
    """load_engine, infer, decode and PoseEstimator on ONNX Runtime with a built engine, torch unimportable."""
    done = subprocess.run([sys.executable, "-c", _RUNTIME, str(xs_engine_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_every_backend_keeps_its_build_step_apart():
    """Each backend package has a runtime and a build step (compiler, in the build room); only its
    thin compile() imports the build step."""
    for name in BACKEND_NAMES:
        assert f"cnpose_trt.backends.{name}.runtime" in MODULES and room(f"cnpose_trt.backends.{name}.runtime") == \
            "backends"
        assert room(f"cnpose_trt.backends.{name}.compiler") == "build"
    doors = {(e.src, e.where) for e in EDGES if is_build_step(e.dst) and room(e.src) != "build"}
    assert doors == {(f"cnpose_trt.backends.{n}", "compile") for n in BACKEND_NAMES}, doors


def _imports_torch(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        lines += [node.lineno for n in names if n == "torch" or n.startswith("torch.")]
    return lines


def test_backend_runtimes_never_import_torch():
    """backends/ outside the torch backend and the build steps never imports torch, at any level."""
    found = [f"{name}:{line}" for name, path in MODULES.items()
             if name.startswith("cnpose_trt.backends") and path.suffix == ".py" and not is_build_step(name)
             and not name.startswith("cnpose_trt.backends.torch") for line in _imports_torch(path)]
    assert not found
    assert _imports_torch(MODULES["cnpose_trt.backends.torch.runtime"])  # the scan sees torch's own


_BACKENDS_BARE = """
import sys
for blocked in ('torch', 'onnx', 'tensorrt', 'cuda', 'cuda.bindings'):
    sys.modules[blocked] = None
import cnpose_trt.backends.onnxruntime, cnpose_trt.backends.tensorrt, cnpose_trt.backends.torch
from cnpose_trt.backends import tensorrt
assert tensorrt.available() is False
assert not [m for m in sys.modules if m.endswith('.compiler') or m.startswith('cnpose_trt.build')], sorted(sys.modules)
print('ok')
"""


def test_backends_import_without_torch_tensorrt_or_their_build_steps():
    done = subprocess.run([sys.executable, "-c", _BACKENDS_BARE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _names_compared(node: ast.Compare) -> bool:
    values = [node.left, *node.comparators]
    if any(isinstance(v, ast.Attribute) and v.attr == "lib" for v in values):
        return False  # ops/_device: the array library of a buffer ("torch" tensors), not a backend
    for v in values:
        if isinstance(v, ast.Constant) and v.value in BACKEND_NAMES:
            return True
        if isinstance(v, (ast.Tuple, ast.List, ast.Set)) and any(
                isinstance(x, ast.Constant) and x.value in BACKEND_NAMES for x in v.elts):
            return True
    return False


def backend_name_comparisons() -> list[str]:
    found = []
    for name, path in MODULES.items():
        if path.suffix != ".py" or name == "cnpose_trt.backends" or name.startswith("cnpose_trt.backends."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and _names_compared(node):
                found.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    return found


def test_backend_name_scan_sees_a_comparison():
    tree = ast.parse("if backend == 'tensorrt' or name in ('torch', 'x'): pass")
    assert sum(_names_compared(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)) == 2
    tree = ast.parse("if backend == 'tensorrt2' or name in ('x',) or buf.lib == 'torch': pass")
    assert not any(_names_compared(n) for n in ast.walk(tree) if isinstance(n, ast.Compare))


def test_backend_names_are_compared_only_inside_backends():
    assert backend_name_comparisons() == []


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # from the def line to the last line, docstring included


def _sizes() -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for name, path in MODULES.items():
        if path.suffix != ".py":
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return modules, functions


def test_no_module_over_600_lines_and_no_function_over_80():
    """Each module holds one step and each function one thing (issue 23): a module past 600 lines or a
    function past 80 is split along its data before it lands."""
    modules, functions = _sizes()
    assert not modules and not functions, "\n".join(modules + functions)


def test_the_size_rule_sees_a_long_function(tmp_path, monkeypatch):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    monkeypatch.setitem(MODULES, "cnpose_trt.long", long)
    assert f"cnpose_trt.long:1 f: {MAX_FUNCTION_LINES + 1} lines" in _sizes()[1]
