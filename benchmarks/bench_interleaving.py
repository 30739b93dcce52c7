"""Why `cnpose-trt bench` alternates engine-only and end-to-end iterations (issue 21, item 6).

The old measure ran all engine-only iterations (on random inputs), then all end-to-end ones; on a
shared machine the load changed between the two and end to end could come out faster than the
engine alone. Prints both ways, three times per precision, XS ONNX Runtime, batch 8 (img/s).

    python benchmarks/bench_interleaving.py
"""

from __future__ import annotations

import tempfile
import time
from functools import partial

import numpy as np

from cnpose_trt import build_engine, load_engine
from cnpose_trt.eval import bench
from cnpose_trt.pipeline.estimator import PoseEstimator

BATCH = 8


def sequential(fn, n: int = 10) -> float:
    fn()
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return BATCH * n / (time.perf_counter() - t0)


def main() -> None:
    folder = tempfile.gettempdir() + "/cnpose-bench-engines"
    for precision in ("fp16", "fp32"):
        engine = load_engine(build_engine("XS", backend="onnxruntime", precision=precision, out_dir=folder,
                                          max_batch=BATCH).path)
        est = PoseEstimator(engine)
        images, boxes = bench._scenes(BATCH)
        noise = np.random.default_rng(0).standard_normal((BATCH, 3, 256, 256)).astype(engine.input_dtype)
        crops = bench._crops(images, boxes, engine.input_dtype)
        for _ in range(3):
            old_noise = sequential(partial(engine.infer, noise))
            old_crops = sequential(partial(engine.infer, crops))
            old_e2e = sequential(partial(est.predict, images, boxes))
            eng, e2e = bench._interleaved(partial(engine.infer, crops), partial(est.predict, images, boxes), 10, 2)
            print(f"{precision} old: engine(randn) {old_noise:.1f} engine(crops) {old_crops:.1f} e2e {old_e2e:.1f} | "
                  f"interleaved: engine {BATCH / eng.mean():.1f} e2e {BATCH / e2e.mean():.1f}", flush=True)


if __name__ == "__main__":
    main()
