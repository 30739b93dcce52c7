"""FP32 / FP16 / INT8 engines per head configuration on ONNX Runtime (CPU): throughput, and the
decoded-joint error of FP16 and INT8 against FP32 on the same inputs.

    python -m pytest benchmarks/test_precision.py --benchmark-only

INT8 is calibrated on generated scenes (--calib-synthetic: for benchmarking only) and the
networks have random weights, so the errors measure what the precision does to these
activations, not pose accuracy on real images. ONNX Runtime's CPU provider runs FP16 graphs by
casting around ops it lacks FP16 kernels for: FP16 speed here says nothing about a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnpose_trt import VARIANTS, load_engine
from cnpose_trt.build.builder import build_engine
from cnpose_trt.build.verify import accuracy_inputs, joint_error

BATCH = int(os.environ.get("CNPOSE_BENCH_BATCH", "8"))
VARIANT_LIST = os.environ.get("CNPOSE_BENCH_VARIANTS", "XS,S,M,L").split(",")
CALIB_COUNT = int(os.environ.get("CNPOSE_BENCH_CALIB", "16"))
ROUNDS = int(os.environ.get("CNPOSE_BENCH_ROUNDS", "5"))
_fp32_heatmaps: dict[str, np.ndarray] = {}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("name", VARIANT_LIST)
def test_onnxruntime_precision(benchmark, name, precision, bench_engine_dir):
    pytest.importorskip("torch")
    kw = {"calib_synthetic": True, "calib_count": CALIB_COUNT} if precision == "int8" else {}
    engine = load_engine(build_engine(name, precision=precision, out_dir=bench_engine_dir, max_batch=BATCH, **kw).path)
    spec = VARIANTS[name]
    x = accuracy_inputs(spec, BATCH)
    heat = engine.infer(x)
    if precision == "fp32":
        _fp32_heatmaps[name] = heat
    benchmark.group = f"precision-ort-{spec.head_tag}-{name}-b{BATCH}"
    info = {"role": "baseline" if precision == "fp32" else "candidate", "backend": f"onnxruntime-cpu-{precision}",
            "images": BATCH, "variant": name, "precision": precision}
    if precision != "fp32" and name in _fp32_heatmaps:
        info["accuracy_vs_fp32"] = joint_error(_fp32_heatmaps[name], heat, spec)
    benchmark.extra_info.update(info)
    benchmark.pedantic(engine.infer, args=(x,), rounds=ROUNDS, warmup_rounds=1)
