from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

# `--backend auto` times the CPU's engines and keeps the fastest (build/auto.py): a choice that depends on the
# machine's load. The suite's builds keep the fixed rule (onnxruntime on the CPU) they were written for, also
# in the commands they run as subprocesses; tests/test_auto_backend.py measures, with injected timings.
os.environ.setdefault("CNPOSE_TRT_AUTO", "first")

# Tests that need no torch run without it: only what builds engines or models asks for it.
try:
    import torch
except ImportError:
    torch = None


def need_torch():
    return pytest.importorskip("torch", reason="building models and engines needs PyTorch (the export extra)")


_EXPORT_MODULES = ("torch", "onnx", "onnxconverter_common")


def _skip_without_export(exc: ImportError) -> None:
    """A test that reaches the export extra (building an engine) is skipped where it is not installed."""
    if (getattr(exc, "name", None) or "").split(".")[0] in _EXPORT_MODULES:
        pytest.skip(f"needs {exc.name} (the export extra), which is not installed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except ImportError as exc:
        _skip_without_export(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except ImportError as exc:
        _skip_without_export(exc)
        raise


def make_model(variant, seed=0):
    need_torch()
    from cnpose_trt.nn.model import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(variant, seed=seed)


def write_official(path: Path, model) -> Path:
    """A checkpoint in the official training layout: DataParallel keys under 'network'."""
    need_torch()
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 24, "network": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def xs_engine_path(engine_dir) -> Path:
    need_torch()
    from cnpose_trt.build.builder import build_engine

    return build_engine("XS", out_dir=engine_dir, max_batch=4).path


@pytest.fixture(scope="session")
def xs_engine(xs_engine_path):
    from cnpose_trt.runtime.engine import load_engine

    return load_engine(xs_engine_path)


@pytest.fixture(scope="session")
def rootnet_snapshot(tmp_path_factory) -> Path:
    """The RootNet golden weights (tests/data/rootnet_golden: random, fitted BatchNorm statistics) saved
    as upstream saves a snapshot: {'network': DataParallel 'module.*' keys}."""
    need_torch()
    import sys
    from collections import OrderedDict

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_rootnet_golden import GOLDEN, golden_state_dict
    finally:
        sys.path.pop(0)
    state = golden_state_dict(dict(np.load(GOLDEN / "rootnet_golden.npz")))
    path = tmp_path_factory.mktemp("rootnet_ckpt") / "snapshot_24.pth.tar"
    torch.save({"epoch": 24, "network": OrderedDict((f"module.{k}", v) for k, v in state.items()), "optimizer": {}},
               path)
    return path


@pytest.fixture(scope="session")
def rootnet_engine_path(rootnet_snapshot, engine_dir) -> Path:
    """An FP32 ONNX Runtime RootNet engine of those weights, built as `--rootnet CHECKPOINT` builds one
    (default max_batch, the session's engine folder: a later request for it finds it cached)."""
    from cnpose_trt.build.builder import build_engine

    return build_engine(model="rootnet", checkpoint=rootnet_snapshot, backend="onnxruntime",
                        out_dir=engine_dir).path


@pytest.fixture(scope="session")
def rootnet_engine(rootnet_engine_path):
    from cnpose_trt.runtime.engine import load_engine

    return load_engine(rootnet_engine_path)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def sigint_default():
    """Ctrl-C raises KeyboardInterrupt during the test, as in a terminal, even where the harness
    started pytest with SIGINT ignored (a script's background job), which a command keeps."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def signal_swallowed(sig: int) -> None:
    """Deliver sig to the main thread inside a bare `except: pass`, as copyreg._slotnames has one:
    the exception its handler raises is lost."""
    from cnpose_trt.interrupts import _raise

    assert signal.getsignal(sig) is _raise, f"not the command's handler: {signal.getsignal(sig)!r}"
    try:
        signal.pthread_kill(threading.main_thread().ident, sig)
        for _ in range(1000):  # the handler runs between bytecodes, inside this try
            pass
    except:  # noqa: E722
        pass
