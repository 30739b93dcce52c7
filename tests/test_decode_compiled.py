"""The compiled CPU decode (cnpose_trt._C) against the float64 oracle, both kernels (AVX2, portable)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnpose_trt.ops.decoding import DeviceArray, decode, soft_argmax_reference
from cnpose_trt.ops.geometry import cells_to_image, flip_back, image_to_camera

_C = pytest.importorskip("cnpose_trt._C", reason="compiled extension not built")
ml_dtypes = pytest.importorskip("ml_dtypes")
ISAS = ["portable"] + (["avx2"] if _C.cpu_has_avx2() else []) + (["avx512"] if _C.cpu_has_avx512() else [])
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def oracle(hm, joints):
    """float64 oracle on exactly the values the kernel sees (low-precision inputs upcast)."""
    return soft_argmax_reference(hm.astype(np.float32), joints)


def check_close(out, hm, joints):
    """float32 accumulation: 1e-5 relative to the volume's extent; confidence 1e-5 relative."""
    ref, conf = oracle(hm, joints)
    extent = max(hm.shape[2], hm.shape[3], hm.shape[1] // joints)
    got = out[..., :3].astype(np.float64)
    finite = np.isfinite(ref).all(-1)
    assert (np.isnan(got[~finite])).all() and np.isnan(out[..., 3][~finite]).all()
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-5 * extent)
    np.testing.assert_allclose(out[..., 3][finite], conf[finite], rtol=1e-5, atol=1e-12)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), j=st.integers(1, 5), d=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 20),
       scale=st.sampled_from([1e-3, 0.5, 3.0, 30.0, 300.0]), dtype=st.sampled_from(DTYPES),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31 - 1), holes=st.booleans())
def test_random_shapes_values_dtypes(n, j, d, h, w, scale, dtype, isa, seed, holes):
    rng = np.random.default_rng(seed)
    hm = (rng.standard_normal((n, j * d, h, w)) * scale).astype(np.float32)
    if holes:  # -inf voxels are allowed: p = 0 there
        hm[rng.random(hm.shape) < 0.3] = -np.inf
    hm = hm.astype(dtype)
    out = _C.decode_host(hm, j, isa=isa, threads=int(rng.integers(1, 4)))
    assert out.shape == (n, j, 10) and out.dtype == np.float32
    check_close(out, hm, j)
    assert np.isnan(out[..., 4:]).all()  # no boxes, no intrinsics


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 18 * 32, 32, 32), (1, 18 * 64, 64, 64)])
def test_real_head_shapes(isa, dtype, shape, rng):
    hm = (rng.standard_normal(shape) * 4).astype(dtype)
    check_close(_C.decode_host(hm, 18, isa=isa), hm, 18)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_hot_voxel_at_every_corner(isa, dtype):
    j, d, h, w = 3, 5, 7, 19  # w not a multiple of 8: vector body and scalar tail
    corners = [(zz, yy, xx) for zz in (0, d - 1) for yy in (0, h - 1) for xx in (0, w - 1, 8, 15)]
    for zz, yy, xx in corners:
        hm = np.full((1, j * d, h, w), -1e4, np.float32)
        for jj in range(j):
            hm[0, jj * d + zz, yy, xx] = 1e4
        out = _C.decode_host(hm.astype(dtype), j, isa=isa)
        np.testing.assert_array_equal(out[0, :, :3], np.tile([xx, yy, zz], (j, 1)))
        np.testing.assert_array_equal(out[0, :, 3], 1.0)


@pytest.mark.parametrize("isa", ISAS)
def test_ties_and_huge_logits(isa):
    hm = np.full((2, 18 * 3, 4, 16), 1e4, np.float32)
    out = _C.decode_host(hm, 18, isa=isa)
    np.testing.assert_allclose(out[..., :3], np.broadcast_to([7.5, 1.5, 1.0], (2, 18, 3)), rtol=1e-6)
    np.testing.assert_allclose(out[..., 3], 1 / (3 * 4 * 16), rtol=1e-6)
    hm = np.full((1, 2, 1, 8), -1e4, np.float32)
    hm[0, 0, 0, 0] = hm[0, 1, 0, 7] = 1e4  # two tied peaks
    np.testing.assert_allclose(_C.decode_host(hm, 1, isa=isa)[0, 0, :4], [3.5, 0, 0.5, 0.5], rtol=1e-6)
    # Huge logits of both signs, rising through the volume: the running max rescales often.
    ramp = np.linspace(-1e4, 1e4, 2 * 8 * 8 * 24, dtype=np.float32).reshape(1, 16, 8, 24)
    check_close(_C.decode_host(ramp, 2, isa=isa), ramp, 2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_rules(isa, dtype):
    rng = np.random.default_rng(4)
    hm = rng.standard_normal((2, 5 * 2, 3, 17)).astype(np.float32)
    hm[0, 0, 1, 9] = np.nan  # joint 0 of image 0
    hm[0, 2:4] = -np.inf  # joint 1: only -inf
    hm[0, 4, 2, 16] = np.inf  # joint 2: +inf
    hm[0, 6, 0, 3] = -np.inf  # joint 3: one -inf voxel is p = 0
    hm[1, 8, 2, 1] = np.nan  # joint 4 of image 1, scalar tail position
    out = _C.decode_host(hm.astype(dtype), 5, isa=isa)
    assert np.isnan(out[0, :3, :4]).all() and np.isnan(out[1, 4, :4]).all()
    assert np.isfinite(out[0, 3:, :4]).all() and np.isfinite(out[1, :4, :4]).all()
    check_close(out, hm.astype(dtype), 5)


def test_fused_post_processing_matches_geometry(rng):
    n, j, d = 4, 18, 8
    hm = (rng.standard_normal((n, j * d, 16, 16)) * 3).astype(np.float32)
    fl = (rng.standard_normal((n, j * d, 16, 16)) * 3).astype(np.float32)
    boxes = np.column_stack([rng.uniform(-50, 500, (n, 2)), np.repeat(rng.uniform(50, 400, (n, 1)), 2, 1)])
    root = rng.uniform(2000, 8000, n)
    intr = np.column_stack([rng.uniform(500, 2000, (n, 2)), rng.uniform(100, 600, (n, 2))])
    res = decode(hm, j, boxes=boxes, root_depth=root, intrinsics=intr, flipped=fl)
    ref = (soft_argmax_reference(hm, j)[0] + flip_back(soft_argmax_reference(fl, j)[0], 16)) / 2
    np.testing.assert_allclose(res.cells, ref, rtol=1e-5, atol=1e-4)
    img = cells_to_image(ref, boxes, (16, 16), d, root)
    np.testing.assert_allclose(res.image, img, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(res.camera, image_to_camera(img, intr), rtol=1e-4, atol=1e-2)
    perm = [0, 4, 5, 6, 1, 2, 3, *range(7, 11), 14, 15, 16, 11, 12, 13, 17]
    conf = (soft_argmax_reference(hm, j)[1] + soft_argmax_reference(fl, j)[1][:, perm]) / 2
    np.testing.assert_allclose(res.confidence, conf, rtol=1e-5)
    rel = decode(hm, j, boxes=boxes)  # no root depth: root-relative mm, no camera
    assert rel.camera is None
    np.testing.assert_allclose(rel.image[..., 2], cells_to_image(soft_argmax_reference(hm, j)[0], boxes,
                                                                 (16, 16), d)[..., 2], rtol=1e-5, atol=1e-3)
    out = np.empty((n, j, 10), np.float32)
    assert decode(hm, j, out=out).packed is out


def test_torch_cpu_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    hm = torch.from_numpy((rng.standard_normal((2, 36, 8, 8))).astype(np.float32))
    res = decode(hm.to(torch.bfloat16), 18)
    assert isinstance(res.packed, torch.Tensor) and res.cells.shape == (2, 18, 3)
    check_close(res.packed.numpy(), hm.to(torch.bfloat16).float().numpy(), 18)


@pytest.mark.parametrize("call, error, message", [
    (lambda: _C.decode_host(np.zeros((2, 36, 4), np.float32)), ValueError, r"heatmaps must have 4 dimensions \(N, J\*D, H, W\), got 3"),
    (lambda: _C.decode_host(np.zeros((1, 35, 4, 4), np.float32)), ValueError, r"channels \(35\) must be divisible by joints \(18\)"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), 18, 3), ValueError, "depth_dim must be a positive integer"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float64)), TypeError, "float32, float16 or bfloat16, got float64"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 8), np.float32)[..., ::2]), ValueError, "C-contiguous"),
    (lambda: _C.decode_host([[1.0]]), TypeError, "heatmaps must be a numpy array on the host, got list"),
    (lambda: _C.decode_host(np.zeros((0, 36, 4, 4), np.float32)), ValueError, "no empty dimension"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), 0), ValueError, "joints must be a positive integer"),
    (lambda: _C.decode_host(np.zeros((2, 36, 4, 4), np.float32), boxes=np.zeros((3, 4))), ValueError, r"boxes must have shape \(2, 4\), got \(3, 4\)"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), boxes=[[0, 0, 0, 5]]), ValueError, r"boxes\[0\] must have width and height > 0"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), boxes=[[0, 0, np.nan, 5]]), ValueError, "boxes must be finite"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), root_depth=[1.0]), ValueError, "root_depth needs boxes"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), boxes=[[0, 0, 5, 5]], intrinsics=[[0, 1, 0, 0]]), ValueError, "focal lengths"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), boxes=[[0, 0, 5, 5]], intrinsics=[[1, 1, 0]]), ValueError, r"intrinsics must have shape \(1, 4\)"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), flipped=np.zeros((1, 36, 4, 4), np.float16), flip_perm=list(range(18))), TypeError, "flipped must have the dtype"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), flipped=np.zeros((1, 36, 4, 2), np.float32), flip_perm=list(range(18))), ValueError, "flipped must have the shape"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), flipped=np.zeros((1, 36, 4, 4), np.float32), flip_perm=[0] * 18), ValueError, "flip_perm must be a permutation"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), flipped=np.zeros((1, 36, 4, 4), np.float32)), ValueError, "flipped needs flip_perm"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), out=np.zeros((1, 18, 9), np.float32)), ValueError, r"out must have shape \(1, 18, 10\)"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), out=np.zeros((1, 18, 10), np.float64)), TypeError, "out must be a float32"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), isa="neon"), ValueError, "isa must be"),
    (lambda: _C.decode_host(np.zeros((1, 36, 4, 4), np.float32), threads=-1), ValueError, "threads must be >= 0"),
    (lambda: _C.decode_device(1, [1, 18 * 2**20, 2**12, 2**12], "float32", out=1), ValueError, "exceeds 2\\^31 - 1 elements"),
    (lambda: _C.decode_device(1, [2**28, 18 * 2**10, 2**10, 2**10], "float16", 18, out=1), ValueError, r"N \* joints = \d+ exceeds"),
    (lambda: _C.decode_device(1, [1, 36, 4, 4], "float64", out=1), TypeError, "float32, float16 or bfloat16, got float64"),
    (lambda: decode(np.zeros((1, 36, 4, 4), np.float32), flip_pairs=[(1, 4)]), ValueError, "flip_pairs is only meaningful"),
    (lambda: decode("heatmaps"), TypeError, "heatmaps must be a numpy array, a torch tensor"),
    (lambda: DeviceArray(0, (1, 36, 4, 4)), ValueError, "ptr must be a positive integer"),
    (lambda: DeviceArray(1, (1, 36, 4, 4), "float64"), TypeError, "dtype must be one of"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(_C.built_with_cuda, reason="this build has CUDA")
def test_cuda_request_without_cuda_build():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.decode_device(1, [1, 36, 4, 4], "float32", out=1)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        decode(DeviceArray(1 << 20, (1, 36, 4, 4)))


def test_numpy_fallback_matches_compiled(monkeypatch, rng):
    """Without the extension, decode() keeps the same contract through the NumPy oracle."""
    import cnpose_trt.ops.decoding as dec

    n, j, d = 3, 18, 4
    hm = (rng.standard_normal((n, j * d, 8, 8)) * 3).astype(np.float32)
    fl = (rng.standard_normal((n, j * d, 8, 8)) * 3).astype(np.float32)
    hm[1, :d] = -np.inf  # joint 0 of image 1: no mass
    kw = dict(boxes=[[10, 20, 100, 100]] * n, root_depth=[3000, 4000, 5000], intrinsics=[800, 900, 320, 240],
              flipped=fl)
    compiled = decode(hm, j, **kw).packed
    monkeypatch.setattr(dec, "compiled", lambda: None)
    fallback = decode(hm, j, **kw).packed
    np.testing.assert_allclose(fallback, compiled, rtol=1e-5, atol=1e-3)
    assert np.isnan(fallback[1, 0]).all()
    with pytest.raises(ValueError, match="intrinsics need boxes"):
        decode(hm, j, intrinsics=[1, 1, 0, 0])


# ------------------------------------------------------------- issue 10: items 9, 11 and 12

def test_refused_threads_mean_fewer_threads(rng):
    """A thread the system refuses used to abort the process; now the calling thread finishes."""
    hm = (rng.standard_normal((6, 18 * 4, 8, 8)) * 3).astype(np.float32)
    want = _C.decode_host(hm, 18, threads=1)
    try:
        for limit in (0, 1):
            _C._set_thread_spawn_limit(limit)
            for threads in (0, 2, 40000):
                np.testing.assert_array_equal(_C.decode_host(hm, 18, threads=threads), want)
            np.testing.assert_array_equal(decode(hm, 18, threads=0).packed, want)
    finally:
        _C._set_thread_spawn_limit(-1)
    np.testing.assert_array_equal(_C.decode_host(hm, 18, threads=40000), want)  # capped, not 40000 threads


@pytest.mark.parametrize("dtype", [">f4", ">f2"])
def test_big_endian_heatmaps(dtype, rng):
    hm = (rng.standard_normal((2, 18 * 2, 5, 6)) * 3).astype(np.float32)
    big = hm.astype(dtype)
    native = big.astype(big.dtype.newbyteorder("="))
    want = decode(native, 18).packed
    np.testing.assert_array_equal(decode(big, 18).packed, want)  # converted, not misread
    np.testing.assert_array_equal(decode(big, 18, flipped=big).packed, decode(native, 18, flipped=native).packed)
    with pytest.raises(TypeError, match="heatmaps must be in the machine's byte order"):
        _C.decode_host(big, 18)
    with pytest.raises(TypeError, match="out must be in the machine's byte order"):
        decode(native, 18, out=np.zeros((2, 18, 10), ">f4"))


def test_out_aliasing_an_input_is_refused(rng):
    hm = (rng.standard_normal((1, 18 * 2, 10, 10)) * 3).astype(np.float32)
    alias = hm.reshape(-1)[: 18 * 10].reshape(1, 18, 10)  # out inside the heatmaps
    with pytest.raises(ValueError, match="out must not overlap heatmaps"):
        decode(hm, 18, out=alias)
    fl = hm.copy()
    with pytest.raises(ValueError, match="out must not overlap flipped"):
        decode(hm, 18, flipped=fl, out=fl.reshape(-1)[-180:].reshape(1, 18, 10))
    boxes = np.zeros((1, 18, 10), np.float32)
    boxes.reshape(-1)[:4] = [0, 0, 10, 10]
    with pytest.raises(ValueError, match="out must not overlap boxes"):
        _C.decode_host(hm, 18, boxes=boxes.reshape(-1)[:4].reshape(1, 4), out=boxes)
    np.testing.assert_array_equal(hm, hm.copy())  # nothing written


def test_depth_range_must_fit_float32(monkeypatch):
    hm = np.zeros((1, 36, 4, 4), np.float32)
    for value in (1e39, float(np.finfo(np.float32).max) * 1.0001):
        with pytest.raises(ValueError, match="depth_range_mm must fit float32"):
            _C.decode_host(hm, 18, boxes=[[0, 0, 10, 10]], depth_range_mm=value)
    out = _C.decode_host(hm, 18, boxes=[[0, 0, 10, 10]], depth_range_mm=3e38)
    assert np.isfinite(out[..., 6]).all()
    import cnpose_trt.ops.decoding as dec

    monkeypatch.setattr(dec, "compiled", lambda: None)
    with pytest.raises(ValueError, match="depth_range_mm must be a positive number that fits float32"):
        decode(hm, 18, boxes=[[0, 0, 10, 10]], depth_range_mm=1e39)


def test_torch_heatmaps_with_numpy_out_and_back(rng):
    torch = pytest.importorskip("torch")
    hm = (rng.standard_normal((2, 36, 8, 8)) * 3).astype(np.float32)
    want = _C.decode_host(hm, 18)
    out = np.empty((2, 18, 10), np.float32)
    res = decode(torch.from_numpy(hm), 18, out=out)
    assert res.packed is out
    np.testing.assert_array_equal(out, want)
    tout = torch.empty(2, 18, 10)
    assert decode(hm, 18, out=tout).packed is tout
    np.testing.assert_array_equal(tout.numpy(), want)
    with pytest.raises(TypeError, match="out must be a float32 numpy array or CPU torch tensor"):
        decode(hm, 18, out=[[0.0]])
