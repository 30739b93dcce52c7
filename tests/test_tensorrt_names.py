"""Every (class, attribute) of TensorRT that cnpose_trt/backends/tensorrt/ uses exists in TensorRT 10.16 and 11.1.

TensorRT cannot be installed here, so its Python API is checked against (class, attribute)
pairs extracted from NVIDIA's pybind11 binding sources (tests/data/tensorrt_names/*.pairs,
written by extract_pairs.py there; each file names the NVIDIA/TensorRT commit it came from).
The backend keeps each TensorRT object in a variable or attribute named after its role
(ROLES); the checker resolves `role.attr`, `trt.Class.MEMBER` and the methods a subclass of a
TensorRT class overrides to (class, attribute) pairs, and also checks the keyword arguments
passed to those methods. A name that exists on another class (`context.tensor_name`,
`config.timing_cache`) is reported: the check is per class, not per string.

What this cannot see: a TensorRT object held in a variable whose name is not a role, argument
types and return values. Those are exercised only where TensorRT runs (tests/test_tensorrt.py).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import pytest

import cnpose_trt.backends.device as device_layer
import cnpose_trt.backends.tensorrt as backend

DATA = Path(__file__).parent / "data" / "tensorrt_names"
RELEASES = ("10.16", "11.1")
# Role (variable or attribute name) -> the TensorRT class its object is.
ROLES = {"trt": "tensorrt", "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
         "config": "IBuilderConfig", "profile": "IOptimizationProfile", "cache": "ITimingCache",
         "stored_cache": "ITimingCache", "plan": "IHostMemory", "runtime": "Runtime", "engine": "ICudaEngine",
         "context": "IExecutionContext", "error": "ParserError", "logger": "ILogger"}

Pairs = dict[str, dict[str, set[str]]]


def load_pairs(release: str) -> tuple[Pairs, str]:
    """(class -> attribute -> keywords, header) of one release's pair file."""
    pairs: Pairs = {}
    header = []
    for line in (DATA / f"tensorrt-{release}.pairs").read_text().splitlines():
        if line.startswith("#"):
            header.append(line)
            continue
        cls, attr, *kws = line.split(" ")
        pairs.setdefault(cls, {})[attr] = set(kws[0].split(",")) if kws else set()
    return pairs, "\n".join(header)


class Use(NamedTuple):
    cls: str
    attr: str
    keywords: tuple[str, ...]
    line: int


def uses(source: str, classes: set[str]) -> list[Use]:
    """The (class, attribute, keywords) a Python source uses on TensorRT objects, by role."""
    tree = ast.parse(source)

    def resolve(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return ROLES.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if owner == "tensorrt" and node.attr in classes:
                return node.attr
            if owner is not None and f"{owner}.{node.attr}" in classes:
                return f"{owner}.{node.attr}"
            if node.attr in ROLES and node.attr != "trt":
                return ROLES[node.attr]
        return None

    keywords: dict[int, tuple[str, ...]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            keywords[id(node.func)] = tuple(k.arg for k in node.keywords if k.arg)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if owner is not None:
                found.append(Use(owner, node.attr, keywords.get(id(node), ()), node.lineno))
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                owner = resolve(base)
                if owner is None:
                    continue
                for item in node.body:  # methods TensorRT calls back must be the base class's
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        found.append(Use(owner, item.name, (), item.lineno))
    return found


def problems(source: str, pairs: Pairs) -> list[str]:
    """Every use of source missing from pairs, as 'line N: Class.attr' (or '... keyword k')."""
    out = []
    for use in sorted(uses(source, set(pairs)), key=lambda u: (u.line, u.cls, u.attr)):
        known = pairs.get(use.cls, {})
        if use.attr not in known:
            out.append(f"line {use.line}: {use.cls}.{use.attr}")
            continue
        out += [f"line {use.line}: {use.cls}.{use.attr} keyword {k}" for k in use.keywords if k not in known[use.attr]]
    return out


# The TensorRT package's modules and the device layer it runs on (cuda-python), each by its path.
BACKEND_SOURCES = {path.name if path.parent.name == "tensorrt" else f"../{path.name}": path.read_text()
                   for path in sorted([*Path(backend.__file__).parent.glob("*.py"), Path(device_layer.__file__)])}


def uses_of_backend(classes: set[str]) -> list[Use]:
    return [u for source in BACKEND_SOURCES.values() for u in uses(source, classes)]


def backend_problems(pairs: Pairs) -> list[str]:
    return [f"{name} {problem}" for name, source in BACKEND_SOURCES.items() for problem in problems(source, pairs)]


@pytest.fixture(scope="module", params=RELEASES)
def release(request):
    return request.param, load_pairs(request.param)[0]


def test_pair_files_name_their_source():
    for release in RELEASES:
        pairs, header = load_pairs(release)
        assert re.search(rf"TensorRT {re.escape(release)}\.\d+\.\d+", header), header
        assert re.search(r"NVIDIA/TensorRT commit [0-9a-f]{40}", header), header
        assert sum(map(len, pairs.values())) > 2000
        # Spot checks written from NVIDIA's headers, independent of the extractor.
        assert "engine_host_code_allowed" in pairs["Runtime"]
        assert {"input_cache", "ignore_mismatch"} == pairs["ITimingCache"]["combine"]
        assert "TF32" in pairs["BuilderFlag"] and "AMPERE_PLUS" in pairs["HardwareCompatibilityLevel"]
        assert "get_tensor_profile_shape" in pairs["ICudaEngine"] and "set_input_shape" in pairs["IExecutionContext"]
        assert "WARNING" in pairs["ILogger"] and "log" in pairs["ILogger"]  # export_values, and the virtual


def test_backend_uses_only_pairs_the_release_has(release):
    version, pairs = release
    found = uses_of_backend(set(pairs))
    used_classes = {u.cls for u in found}
    # The scan sees the backend's whole TensorRT surface.
    assert {"tensorrt", "Builder", "IBuilderConfig", "OnnxParser", "IOptimizationProfile", "ITimingCache", "Runtime",
            "ICudaEngine", "IExecutionContext", "ILogger", "IProgressMonitor", "BuilderFlag", "TensorIOMode",
            "HardwareCompatibilityLevel", "MemoryPoolType"} <= used_classes, sorted(used_classes)
    assert len({(u.cls, u.attr) for u in found}) > 50
    assert any(u.keywords for u in found)  # keyword arguments are seen, so checked
    missing = backend_problems(pairs)
    assert not missing, f"TensorRT {version} lacks:\n" + "\n".join(missing)


def test_checker_reports_misspelt_and_misplaced_names():
    """Names that exist on some other TensorRT class, or not at all, are reported per class."""
    snippet = (
        "def f(trt, context, config, engine, runtime):\n"
        "    context.tensor_name(0)\n"                                   # ICudaEngine.get_tensor_name
        "    config.timing_cache = None\n"                                # IBuilderConfig.get_timing_cache
        "    engine.get_tensor_shape('x')\n"                              # fine
        "    runtime.engine_host_code_allowed = True\n"                   # fine
        "    config.set_timing_cache(None, ignore_missmatch=False)\n"     # misspelt keyword
        "    trt.BuilderFlag.TF23\n"                                      # misspelt enum member
        "    class M(trt.IProgressMonitor):\n"
        "        def phase_begin(self, name, parent, steps): pass\n"      # not a callback TensorRT calls
    )
    for release in RELEASES:
        pairs, _ = load_pairs(release)
        assert problems(snippet, pairs) == [
            "line 2: IExecutionContext.tensor_name", "line 3: IBuilderConfig.timing_cache",
            "line 6: IBuilderConfig.set_timing_cache keyword ignore_missmatch", "line 7: BuilderFlag.TF23",
            "line 9: IProgressMonitor.phase_begin"], release


def test_checker_knows_what_11_removed():
    """Builder precision flags and calibrators of 10.x are gone from 11.x: the pairs say so."""
    snippet = "def f(trt, config):\n    config.set_flag(trt.BuilderFlag.FP16)\n    config.int8_calibrator = None\n"
    assert problems(snippet, load_pairs("10.16")[0]) == []
    assert problems(snippet, load_pairs("11.1")[0]) == ["line 2: BuilderFlag.FP16",
                                                        "line 3: IBuilderConfig.int8_calibrator"]


def test_backend_never_uses_removed_precision_flags():
    for banned in ("BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8", "int8_calibrator", "EXPLICIT_BATCH"):
        assert not any(banned in source for source in BACKEND_SOURCES.values()), banned


def test_backend_names_exist_in_the_11_4_wheel():
    """Weaker, for the newest wheel (11.4, newer than the stored sources): every attribute name the
    backend uses is a string of the real tensorrt-cu13-bindings 11.4 module (exactly, or as the
    tail of a longer string: the linker merges tails). Catches a name dropped after 11.1."""
    lines = (DATA / "tensorrt-11.4.txt").read_text().splitlines()
    names = {line for line in lines if line and not line.startswith("#")}
    tails = {n[i:] for n in names for i in range(1, len(n) - 1)}
    pairs, _ = load_pairs("11.1")
    used = {u.attr for u in uses_of_backend(set(pairs))}
    missing = sorted(n for n in used if n not in names and n not in tails and not n.startswith("__"))
    assert not missing, missing


def test_cuda_python_names_exist():
    """cuda-python installs and imports without a GPU: check the runtime API the backend uses."""
    cudart = pytest.importorskip("cuda.bindings.runtime")
    trees = [ast.parse(source) for source in BACKEND_SOURCES.values()]

    def is_cudart(node):  # `cudart.X` or `cuda_runtime().X`
        return (isinstance(node, ast.Name) and node.id == "cudart") or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cuda_runtime")

    used = {n.attr for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_cudart(n.value)}
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamCreate", "cudaStreamSynchronize", "cudaGetErrorName",
            "cudaDriverGetVersion", "cudaRuntimeGetVersion"} <= used
    missing = sorted(n for n in used if not hasattr(cudart, n))
    assert not missing, f"cuda.bindings.runtime lacks {missing}"
    for kind in re.findall(r'"(cudaMemcpy\w+)"', "".join(BACKEND_SOURCES.values())):  # by name in Stream.copy
        assert hasattr(cudart.cudaMemcpyKind, kind), kind
    assert hasattr(cudart.cudaError_t, "cudaSuccess")
