"""The CUDA decode against the float64 oracle. Runs where a GPU, torch with CUDA and a CUDA
build of cnpose_trt._C are present (benchmarks/gpu_check.sh); skipped elsewhere."""

import numpy as np
import pytest

from cnpose_trt.ops.decoding import DeviceArray, decode, soft_argmax_reference

pytestmark = pytest.mark.cuda
torch = pytest.importorskip("torch")
_C = pytest.importorskip("cnpose_trt._C", reason="compiled extension not built")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not _C.built_with_cuda:
    pytest.skip("cnpose_trt._C was built without CUDA", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_close(out, hm, joints):
    """out: (N, J, 10) torch CUDA; hm: torch tensor the kernel read. float32 tolerance."""
    host = hm.float().cpu().numpy()
    ref, conf = soft_argmax_reference(host, joints)
    got = out.cpu().numpy()
    extent = max(host.shape[2], host.shape[3], host.shape[1] // joints)
    finite = np.isfinite(ref).all(-1)
    assert np.isnan(got[..., :4][~finite]).all()
    np.testing.assert_allclose(got[..., :3][finite], ref[finite], rtol=1e-5, atol=1e-5 * extent)
    np.testing.assert_allclose(got[..., 3][finite], conf[finite], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 18 * 32, 32, 32), (2, 18 * 64, 64, 64), (2, 5 * 3, 7, 19), (1, 1, 1, 1),
                                   (4, 2 * 6, 5, 8), (1, 3 * 2, 9, 12)])
def test_matches_oracle(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    hm = (torch.randn(shape, device="cuda", generator=g) * 4).to(dtype)
    j = 18 if shape[1] % 18 == 0 else {15: 5, 12: 2, 6: 3, 1: 1}[shape[1]]
    res = decode(hm, j)
    assert isinstance(res.packed, torch.Tensor) and res.packed.device == hm.device
    check_close(res.packed, hm, j)


def test_random_fuzz():
    rng = np.random.default_rng(7)
    for _ in range(60):
        n, j, d, h, w = (int(rng.integers(1, k)) for k in (4, 6, 7, 10, 40))
        dtype = DTYPES[int(rng.integers(0, 3))]
        hm = torch.from_numpy(rng.standard_normal((n, j * d, h, w)).astype(np.float32) * float(rng.choice([0.01, 3, 300])))
        if rng.random() < 0.5:
            hm[torch.from_numpy(rng.random(hm.shape) < 0.3)] = -float("inf")
        hm = hm.to(dtype).cuda()
        check_close(decode(hm, j).packed, hm, j)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_unvectorisable(dtype):
    base = torch.randn(1 + 2 * 18 * 4 * 16, device="cuda").to(dtype)
    hm = base[1:].view(2, 18 * 4, 2, 8)  # 1 element off a 16-byte boundary: scalar path
    assert hm.data_ptr() % 16 != 0
    check_close(decode(hm, 18).packed, hm, 18)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hot_voxel_corners_and_nan_rules(dtype):
    j, d, h, w = 3, 4, 6, 16
    for zz, yy, xx in [(0, 0, 0), (d - 1, h - 1, w - 1), (0, h - 1, 7), (d - 1, 0, 8)]:
        hm = torch.full((1, j * d, h, w), -1e4, device="cuda")
        for jj in range(j):
            hm[0, jj * d + zz, yy, xx] = 1e4
        out = decode(hm.to(dtype), j).packed.cpu().numpy()
        np.testing.assert_array_equal(out[0, :, :3], np.tile([xx, yy, zz], (j, 1)))
        np.testing.assert_array_equal(out[0, :, 3], 1.0)
    hm = torch.randn(2, 5 * 2, 3, 16, device="cuda")
    hm[0, 0, 1, 9] = float("nan")
    hm[0, 2:4] = -float("inf")
    hm[0, 4, 2, 15] = float("inf")
    hm[0, 6, 0, 3] = -float("inf")
    out = decode(hm.to(dtype), 5).packed
    assert torch.isnan(out[0, :3, :4]).all() and torch.isfinite(out[0, 3:, :4]).all()
    check_close(out, hm.to(dtype), 5)


def test_fused_post_processing_matches_cpu():
    rng = np.random.default_rng(3)
    n, j, d = 5, 18, 16
    hm = (rng.standard_normal((n, j * d, 16, 16)) * 3).astype(np.float32)
    fl = (rng.standard_normal((n, j * d, 16, 16)) * 3).astype(np.float32)
    boxes = np.column_stack([rng.uniform(-50, 500, (n, 2)), np.repeat(rng.uniform(50, 400, (n, 1)), 2, 1)])
    root = rng.uniform(2000, 8000, n)
    intr = np.column_stack([rng.uniform(500, 2000, (n, 2)), rng.uniform(100, 600, (n, 2))])
    cpu = decode(hm, j, boxes=boxes, root_depth=root, intrinsics=intr, flipped=fl).packed
    dev = decode(torch.from_numpy(hm).cuda(), j, boxes=torch.from_numpy(boxes).float().cuda(),
                 root_depth=root, intrinsics=intr, flipped=torch.from_numpy(fl).cuda())
    np.testing.assert_allclose(dev.packed.cpu().numpy(), cpu, rtol=2e-5, atol=2e-3)
    assert dev.camera.shape == (n, j, 3) and dev.camera.is_cuda


def test_stream_capture_proves_no_host_sync():
    hm = torch.randn(4, 18 * 8, 16, 16, device="cuda")
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 4, device="cuda")
    out = torch.empty(4, 18, 10, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # a host sync inside would abort the capture
        decode(hm, 18, boxes=boxes, out=out, stream=stream.cuda_stream)
    hm.copy_(torch.randn_like(hm))
    graph.replay()
    torch.cuda.synchronize()
    check_close(out, hm, 18)


def test_non_default_stream():
    stream = torch.cuda.Stream()
    hm = torch.randn(8, 18 * 32, 32, 32, device="cuda")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        res = decode(hm, 18)  # picks the current (non-default) stream
    stream.synchronize()
    check_close(res.packed, hm, 18)


def test_raw_pointer_like_tensorrt_buffers():
    hm = torch.randn(2, 18 * 32, 32, 32, device="cuda").half()
    raw = DeviceArray(hm.data_ptr(), tuple(hm.shape), "float16")
    out = torch.empty(2, 18, 10, device="cuda")
    res = decode(raw, 18, out=DeviceArray(out.data_ptr(), (2, 18, 10)))
    torch.cuda.synchronize()
    check_close(out, hm, 18)
    assert isinstance(res.packed, DeviceArray)
    allocated = decode(DeviceArray(hm.data_ptr(), tuple(hm.shape), "float16"), 18)  # out from torch
    torch.cuda.synchronize()
    check_close(allocated.packed, hm, 18)


def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    hm = cupy.random.standard_normal((2, 18 * 8, 16, 16), dtype=cupy.float32)
    res = decode(hm, 18, boxes=np.array([[0, 0, 64, 64]] * 2))
    assert isinstance(res.packed, cupy.ndarray)
    check_close(torch.as_tensor(res.packed, device="cuda"), torch.as_tensor(hm, device="cuda"), 18)


def test_dlpack_only_object():
    class Producer:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kwargs):
            return self.t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    hm = torch.randn(1, 36, 8, 8, device="cuda")
    check_close(decode(Producer(hm), 18).packed, hm, 18)


def test_device_errors():
    hm = torch.randn(1, 36, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="out is on the host"):
        decode(hm, 18, out=torch.empty(1, 18, 10))
    host = np.zeros((1, 36, 8, 8), np.float32)
    with pytest.raises(ValueError, match="must be GPU memory|not a CUDA device pointer"):
        decode(DeviceArray(host.ctypes.data, host.shape), 18, out=torch.empty(1, 18, 10, device="cuda"))
    with pytest.raises(ValueError, match="C-contiguous"):
        decode(hm.transpose(2, 3), 18)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        decode(hm.double(), 18)
    with pytest.raises(ValueError, match=r"out must have shape \(1, 18, 10\)"):
        decode(hm, 18, out=torch.empty(2, 18, 10, device="cuda"))
    with pytest.raises(ValueError, match="flip averaging on the GPU supports at most 128 joints"):
        big = torch.randn(1, 200, 2, 8, device="cuda")
        decode(big, 200, flipped=big, flip_pairs=[])
