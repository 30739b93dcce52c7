"""Issue 20, item 9: an edited sidecar, or another engine's bytes under a sidecar whose sha256 was
recomputed, is refused at load as damaged (naming the file and the field) and rebuilt by `build`,
never reported "up to date". What the engine shows about itself is read by graph_facts (without
onnx), checked here against onnx's own parse of the same files."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cnpose_trt import EngineError, load_engine
from cnpose_trt.backends.graph_facts import read_graph_facts
from cnpose_trt.build.builder import build_engine
from cnpose_trt.cache import file_sha256, sidecar_path
from cnpose_trt.spec import VARIANTS, conv_weight_shapes

BUILDS = {  # name: build_engine arguments (max_batch 4 as the session's xs_engine_path)
    "XS fp32": dict(variant="XS"),
    "XS fp16": dict(variant="XS", precision="fp16"),
    "XS int8": dict(variant="XS", precision="int8", calib_synthetic=True, calib_count=8),
    "XS int8 trt": dict(variant="XS", precision="int8", calib_synthetic=True, calib_count=8,
                        int8_scheme="trt-symmetric"),
    "S fp32": dict(variant="S"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("contents")
    return {name: build_engine(**kw, backend="onnxruntime", out_dir=out, max_batch=4).path
            for name, kw in BUILDS.items()}


def _cache_copy(built: dict[str, Path], tmp_path: Path) -> Path:
    """The built engines and sidecars in a folder of their own (the calibration ranges too)."""
    src = next(iter(built.values())).parent
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copy(p, tmp_path / p.name)
    return tmp_path


def _sidecar(folder: Path, name: str, built: dict[str, Path]) -> tuple[Path, dict]:
    side = folder / sidecar_path(built[name]).name
    return side, json.loads(side.read_text())


def _rebuild(name: str, folder: Path):
    messages = []
    result = build_engine(**BUILDS[name], backend="onnxruntime", out_dir=folder, max_batch=4,
                          progress=messages.append)
    return result, messages


# ---------------------------------------------------------------- what graph_facts reads

def test_graph_facts_equal_onnxs_own_parse(built):
    onnx = pytest.importorskip("onnx")
    for name, path in built.items():
        model = onnx.load(str(path))
        facts = read_graph_facts(path)
        assert facts.ops == dict(collections.Counter(n.op_type for n in model.graph.node)), name
        assert facts.initializers == tuple((tuple(t.dims), t.data_type) for t in model.graph.initializer), name
        casts = {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
        assert facts.cast_to == casts, name
        assert facts.precision == name.split()[1], name
        assert facts.conv_weight_shapes() == conv_weight_shapes(VARIANTS[name.split()[0]]), name


def test_graph_facts_refuse_what_is_not_an_onnx_model(built, tmp_path):
    data = built["XS fp32"].read_bytes()
    rng = np.random.default_rng(20)
    cases = {"empty": b"", "truncated": data[: len(data) // 3], "noise": rng.bytes(4096),
             "text": b"not an onnx file", "overlong varint": b"\x3a" + b"\xff" * 20}
    for label, blob in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.onnx"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match="not an ONNX model|empty"):
            read_graph_facts(path)


def test_conv_weight_shapes_are_the_deploy_models_for_every_variant():
    pytest.importorskip("torch")
    from conftest import make_model
    from torch import nn

    from cnpose_trt.build.export import fuse_batchnorm

    for name, spec in VARIANTS.items():
        fused = fuse_batchnorm(make_model(name))
        shapes = collections.Counter(tuple(m.weight.shape) for m in fused.modules() if isinstance(m, nn.Conv2d))
        assert dict(shapes) == conv_weight_shapes(spec), name


# ---------------------------------------------------------------- edited sidecars

EDITS = {
    "input.mean": lambda m: m["input"].update(mean=[0.5, 0.5, 0.5]),
    "input.std": lambda m: m["input"].update(std=[1.0, 1.0, 1.0]),
    "input.convention": lambda m: m["input"].update(convention="rgb-0..1-minus-mean-over-std"),
    "precision": lambda m: m.update(precision="fp16"),
    "variant": lambda m: m.update(variant="S"),
    "head": lambda m: m.update(head="2UP-256ch-D32"),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_sidecar_is_refused_and_rebuilt(built, tmp_path, field):
    folder = _cache_copy(built, tmp_path)
    side, meta = _sidecar(folder, "XS fp32", built)
    EDITS[field](meta)
    side.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=rf"(damaged|does not match).*{field}.*rebuild") as info:
        load_engine(side)
    assert "\n" not in str(info.value) and side.name.split(".")[0] in str(info.value)
    result, messages = _rebuild("XS fp32", folder)
    assert not result.cached and not any("up to date" in m for m in messages)
    assert any("not reusing the cached engine" in m and field in m for m in messages)
    load_engine(result.path)  # the rebuilt engine and sidecar agree
    assert _rebuild("XS fp32", folder)[0].cached


def test_a_sidecar_whose_precision_and_options_were_both_edited_is_refused_by_its_graph(built, tmp_path):
    """fp16 engine, sidecar rewritten to say fp32 consistently: only the graph's float16 tensors tell."""
    folder = _cache_copy(built, tmp_path)
    side, meta = _sidecar(folder, "XS fp16", built)
    meta.update(precision="fp32", precision_options={})
    side.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=r"precision says 'fp32', its graph is fp16 \(float16 tensors"):
        load_engine(side)


# ---------------------------------------------------------------- another engine's bytes

SWAPS = [  # (sidecar of, bytes of, message)
    ("XS fp32", "S fp32", r"spec says variant XS \(2UP-128ch-D32\), its convolution weights are another network's "
                          r"\(lacks \(40, 1, 7, 7\); has \(48, 1, 7, 7\)\)"),
    ("XS fp32", "XS int8", r"precision says 'fp32', its graph is int8 \(quantize/dequantize nodes\)"),
    ("XS int8", "XS fp32", r"precision says 'int8', its graph is fp32 \(no float16 tensors, no quantize"),
    ("XS fp16", "XS fp32", r"precision says 'fp16', its graph is fp32 \(no float16 tensors, no quantize"),
    # Issue 22: the onnxruntime int8 graph (ort-u8s8) and the TensorRT-shaped one are both int8.
    ("XS int8", "XS int8 trt", r"int8_kernels.engine_file says 12 QLinearAdd, 45 QLinearConv \(int8_scheme "
                               r"'ort-u8s8'\), its graph holds 0 QLinearAdd, 3 QLinearConv"),
    ("XS int8 trt", "XS int8", r"int8_kernels.engine_file says 0 QLinearAdd, 3 QLinearConv \(int8_scheme "
                               r"'trt-symmetric'\), its graph holds 12 QLinearAdd, 45 QLinearConv"),
]


@pytest.mark.parametrize("side_of, bytes_of, message", SWAPS)
def test_another_engines_bytes_under_a_recomputed_sha256_are_refused_and_rebuilt(built, tmp_path, side_of, bytes_of,
                                                                                 message):
    folder = _cache_copy(built, tmp_path)
    side, meta = _sidecar(folder, side_of, built)
    engine = folder / meta["engine_file"]
    shutil.copy(built[bytes_of], engine)
    meta["engine_sha256"] = file_sha256(engine)
    if bytes_of == "XS fp32" and side_of == "XS fp16":
        meta["output"]["dtype"] = "float32"  # also agree on the I/O, which onnxruntime checks first
    side.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=rf"engine {engine}.* does not match its metadata \(damaged or swapped\): "
                                          rf"{message}.*; rebuild with --force"):
        load_engine(side)
    result, messages = _rebuild(side_of, folder)
    assert not result.cached and not any("up to date" in m for m in messages)
    rebuilt = load_engine(result.path)
    assert rebuilt.precision == side_of.split()[1] and read_graph_facts(rebuilt.path).precision == rebuilt.precision


def test_torch_engine_checks_its_checkpoint_against_the_sidecar(tmp_path):
    pytest.importorskip("torch")
    xs = build_engine("XS", backend="torch", out_dir=tmp_path, max_batch=4)
    s = build_engine("S", backend="torch", out_dir=tmp_path, max_batch=4)
    side = sidecar_path(xs.path)
    meta = json.loads(side.read_text())
    shutil.copy(s.path, xs.path)
    side.write_text(json.dumps({**meta, "engine_sha256": file_sha256(xs.path)}))
    with pytest.raises(EngineError, match=r"spec says variant XS \(2UP-128ch-D32\), the file holds variant S"):
        load_engine(side)
    result = build_engine("XS", backend="torch", out_dir=tmp_path, max_batch=4)
    assert not result.cached
    load_engine(result.path)
    # Same variant, other weights (seed 1) under the seed-0 sidecar.
    other = build_engine("XS", backend="torch", out_dir=tmp_path / "seed1", max_batch=4, seed=1)
    engine = sidecar_path(result.path).with_name(json.loads(sidecar_path(result.path).read_text())["engine_file"])
    shutil.copy(other.path, engine)
    meta = json.loads(sidecar_path(result.path).read_text())
    sidecar_path(result.path).write_text(json.dumps({**meta, "engine_sha256": file_sha256(engine)}))
    with pytest.raises(EngineError, match=r"weights\.sha256 says [0-9a-f]{12}\.\.\., the file's weights hash otherwise"):
        load_engine(result.path)
    assert not build_engine("XS", backend="torch", out_dir=tmp_path, max_batch=4).cached
