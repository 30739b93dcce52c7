"""Network forward throughput per head configuration: ONNX Runtime engine vs PyTorch eager.

    python -m pytest benchmarks/test_forward.py --benchmark-only

Baseline: PyTorch eager (what a user of the upstream code runs). Candidate: the onnxruntime
engine that `python -m cnpose_trt.build` makes. Same input, same process, same run.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from cnpose_trt import VARIANTS

torch = pytest.importorskip("torch")
BATCH = int(os.environ.get("CNPOSE_BENCH_BATCH", "8"))
VARIANT_LIST = os.environ.get("CNPOSE_BENCH_VARIANTS", "XS,S,M,L").split(",")


def _group(name: str) -> str:
    return f"forward-{VARIANTS[name].head_tag}-{name}-b{BATCH}"


def _images(name: str) -> np.ndarray:
    from cnpose_trt.build.verify import accuracy_inputs

    return accuracy_inputs(VARIANTS[name], BATCH)  # real crops in upstream's input convention


@pytest.mark.parametrize("name", VARIANT_LIST)
def test_torch_eager(benchmark, name):
    from cnpose_trt.nn.model import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name)
    x = torch.from_numpy(_images(name))
    benchmark.group = _group(name)
    benchmark.extra_info.update(role="baseline", backend=f"torch-eager-fp32 ({torch.get_num_threads()} thr)",
                                images=BATCH, variant=name)

    def run():
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert tuple(out.shape) == (BATCH, *VARIANTS[name].heatmap_shape)


@pytest.mark.parametrize("name", VARIANT_LIST)
def test_onnxruntime_engine(benchmark, name, bench_engine_dir):
    from cnpose_trt import build_engine, load_engine

    engine = load_engine(build_engine(name, out_dir=bench_engine_dir, max_batch=max(BATCH, 32)).path)
    x = _images(name)
    benchmark.group = _group(name)
    benchmark.extra_info.update(role="candidate", backend="onnxruntime-cpu-fp32", images=BATCH, variant=name)
    out = benchmark.pedantic(engine.infer, args=(x,), rounds=5, warmup_rounds=1)
    assert out.shape == (BATCH, *VARIANTS[name].heatmap_shape)
