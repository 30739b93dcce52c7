"""The CUDA crop-and-normalise against the float64 reference and the CPU kernel. Runs where a GPU,
torch with CUDA and a CUDA build of cnpose_trt._C are present (benchmarks/gpu_check.sh);
skipped elsewhere.

Tolerance: the CUDA kernel computes sample positions in float32 as offsets from the image
position of the crop centre (csrc/crop/crop.h): a position is off by at most ~4 float32 roundings of
the offset, 4 * 2^-24 * (half the crop's footprint + 1) px per axis, which moves a bilinear value
by at most 255 grey levels per px of position in each axis; plus the float32 arithmetic of the
CPU kernels (5e-4 in normalised units).
"""

import numpy as np
import pytest
from crop_reference import STD, box_affine, random_affine, reference

from cnpose_trt.ops.cropping import crop_normalize
from cnpose_trt.ops.decoding import DeviceArray

pytestmark = pytest.mark.cuda
torch = pytest.importorskip("torch")
_C = pytest.importorskip("cnpose_trt._C", reason="compiled extension not built")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not _C.built_with_cuda:
    pytest.skip("cnpose_trt._C was built without CUDA", allow_module_level=True)


def tolerance(m, size):
    """Normalised-units bound for one person (module docstring)."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    half_footprint = 0.5 * (size - 1) * np.abs(inv[:, :2]).sum(axis=1).max()
    dpos = 4 * 2.0**-24 * (half_footprint + 1)
    return 5e-4 + 2 * 255 * dpos / STD.min()


def check(got, ref, tol):
    err = np.abs(got.float().cpu().numpy().astype(np.float64) - ref)
    assert (err <= tol).all(), f"error over its bound by {np.max(err - tol):.3g} (max error {err.max():.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_maps_several_images(dtype):
    rng = np.random.default_rng(3)
    for _ in range(20):
        imgs = [rng.integers(0, 256, (int(rng.integers(1, 70)), int(rng.integers(1, 70)), 3), dtype=np.uint8)
                for _ in range(int(rng.integers(1, 4)))]
        p, s = int(rng.integers(1, 7)), int(rng.integers(1, 80))
        index = rng.integers(0, len(imgs), p)
        mats = np.stack([random_affine(rng, *imgs[k].shape[:2], s, rng.random() < 0.4) for k in index])
        flip = rng.random(p) < 0.5
        out = crop_normalize([torch.from_numpy(i).cuda() for i in imgs], index, mats, s, flip=flip, dtype=dtype)
        assert out.is_cuda and out.dtype == dtype and out.shape == (p, 3, s, s)
        for q in range(p):
            ref = reference(imgs[index[q]], mats[q], s, flip[q])
            tol = tolerance(mats[q], s) + (2.0**-11 * np.abs(ref) if dtype == torch.float16 else 0)
            check(out[q], ref, tol)


def test_round_pixels_matches_the_cpu_kernel():
    """Rounded to integer grey levels: equal to the CPU kernel but where a value lies within the
    kernels' position noise of k + 1/2 (rare; one grey level then)."""
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    mats = np.stack([random_affine(rng, 300, 400, 128, rng.random() < 0.3) for _ in range(8)])
    gpu = crop_normalize(torch.from_numpy(img).cuda(), None, mats, 128, round_pixels=True).cpu().numpy()
    cpu = crop_normalize(img, None, mats, 128, round_pixels=True)
    diff = np.abs(gpu.astype(np.float64) - cpu)
    assert (diff > 1e-3).mean() <= 1e-3 and diff.max() <= 1 / STD.min() + 1e-3


def test_photo_sized_image_edges_and_many_people():
    """100 people (more than one launch carries) from a 4000x3000 image, against the CPU kernel."""
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    boxes = np.column_stack([rng.uniform(-500, 4200, 100), rng.uniform(-500, 3200, 100)])
    sides = np.exp(rng.uniform(np.log(2), np.log(4000), 100))
    mats = np.stack([box_affine(x, y, w, w, 256) for (x, y), w in zip(boxes, sides, strict=True)])
    gpu = crop_normalize(torch.from_numpy(img).cuda(), None, mats, 256).cpu().numpy()
    cpu = crop_normalize(img, None, mats, 256)
    for q in range(100):
        np.testing.assert_allclose(gpu[q], cpu[q], rtol=0, atol=tolerance(mats[q], 256))


def test_raw_pointers_and_a_side_stream():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    dev = torch.from_numpy(img).cuda()
    mats = np.stack([box_affine(-10, 5, 80, 80, 64), box_affine(60, 40, 70, 90, 64)])
    out = torch.empty(2, 3, 64, 64, device="cuda")
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    res = crop_normalize([DeviceArray(dev.data_ptr(), (90, 120, 3), "uint8")], [0, 0], mats, 64,
                         out=DeviceArray(out.data_ptr(), (2, 3, 64, 64)), stream=stream.cuda_stream)
    assert isinstance(res, DeviceArray)
    stream.synchronize()
    for q in range(2):
        check(out[q], reference(img, mats[q], 64), tolerance(mats[q], 64))


def test_cuda_graph_capture():
    """No allocation and no sync inside: the call can be captured and replayed."""
    rng = np.random.default_rng(6)
    img = torch.from_numpy(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).cuda()
    mats = np.stack([box_affine(10, 10, 50, 50, 32)] * 3)
    out = torch.empty(3, 3, 32, 32, device="cuda")
    crop_normalize(img, None, mats, 32, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        crop_normalize(img, None, mats, 32, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    check(out[0], reference(img.cpu().numpy(), mats[0], 32), tolerance(mats[0], 32))


def test_huge_image_over_2_to_31_bytes():
    big = torch.zeros((27000, 27000, 3), dtype=torch.uint8, device="cuda")
    patch = np.random.default_rng(7).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big[26700:, 26700:] = torch.from_numpy(patch).cuda()
    m = box_affine(26800.3, 26850.7, 400, 400, 64)
    out = crop_normalize(big, None, m[None], 64)
    shifted = m.copy()
    shifted[:, 2] += m[:, :2] @ [26600, 26600]
    check(out[0], reference(big[26600:, 26600:].cpu().numpy(), shifted, 64), tolerance(m, 64))
    del big
    torch.cuda.empty_cache()


def test_bad_device_inputs():
    img = torch.zeros((8, 8, 3), dtype=torch.uint8, device="cuda")
    m = box_affine(0, 0, 8, 8, 4)[None]
    with pytest.raises(ValueError, match=r"images\[0\] must have interleaved RGB pixels"):
        crop_normalize(img[:, ::2], None, m, 4)
    with pytest.raises(TypeError, match=r"images\[0\] must be uint8 RGB"):
        crop_normalize(img.float(), None, m, 4)
    with pytest.raises(ValueError, match="images must all be on the host or all on the GPU"):
        crop_normalize([img.cpu().numpy(), img], [0, 1], np.concatenate([m, m]), 4)
    with pytest.raises(ValueError, match=r"out must have shape \(1, 3, 4, 4\)"):
        crop_normalize(img, None, m, 4, out=torch.empty(1, 3, 4, 5, device="cuda"))
    with pytest.raises(TypeError, match="out must be a device array"):
        crop_normalize(img, None, m, 4, out=np.zeros((1, 3, 4, 4), np.float32))
    buf = torch.zeros(8 * 8 * 3 + 3 * 4 * 4 * 4, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="out must not overlap images"):
        crop_normalize(buf[: 8 * 8 * 3].view(8, 8, 3), None, m, 4, out=buf[: 3 * 4 * 4 * 4].view(torch.float32).view(1, 3, 4, 4))


def test_decode_out_overlapping_heatmaps_is_refused():
    from cnpose_trt.ops.decoding import decode

    hm = torch.randn(1, 36, 10, 10, device="cuda")
    with pytest.raises(ValueError, match="out must not overlap heatmaps"):
        decode(hm, 18, out=hm.view(-1)[:180].view(1, 18, 10))
