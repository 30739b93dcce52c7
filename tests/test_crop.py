"""The fused crop-and-normalise (cnpose_trt._C.crop_host, cropping.crop_normalize) against an
independent float64 reference, against cv2.warpAffine (the sample convention it follows), on
random and adversarial inputs, every CPU kernel (portable, AVX2, AVX-512) and both output dtypes.

Tolerances:
- float32 output vs the float64 reference: 5e-4 in normalised units (about 1e-4 grey levels).
  The kernel interpolates and normalises in float32; outputs reach about 1136, where one
  float32 ulp is 1.2e-4, and three rounded terms are summed.
- float16 output: exactly the kernel's float32 result rounded to float16 (same arithmetic, one
  conversion), hence within half a float16 ulp of the reference plus the float32 error.
- vs cv2.warpAffine on uint8 images: OpenCV rounds its uint8 result to an integer (<= 0.5 grey
  levels off the exact value); up to OpenCV 4.10 it also snaps the sample position to 1/32 px in
  x and y (<= 1/64 px each), which moves a bilinear value by at most 1/64 of the local pixel
  difference per axis (<= 255/64 grey levels at a black/white edge). Bound per output pixel, in
  grey levels: 0.5 + (dx + dy) / 64 + 1e-3, dx and dy the largest neighbour differences around
  the sample. OpenCV 5 (installed here) computes in float and meets 0.5 + 1e-3.
"""

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from crop_reference import MEAN, STD, box_affine, random_affine, reference, reference_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnpose_trt.ops.cropping import crop_normalize

_C = pytest.importorskip("cnpose_trt._C", reason="compiled extension not built")
cv2 = pytest.importorskip("cv2")
ISAS = ["portable"] + (["avx2"] if _C.cpu_has_avx2() else []) + (["avx512"] if _C.cpu_has_avx512() else [])
ATOL32 = 5e-4
CV2_FLOAT_WARP = tuple(int(v) for v in cv2.__version__.split(".")[:2]) >= (4, 11)


def check32(got, ref):
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - ref)
    assert err.max() <= ATOL32, f"max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


# ------------------------------------------------------------------------------- random inputs

@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), images=st.integers(1, 3), people=st.integers(1, 5), size=st.integers(1, 40),
       isa=st.sampled_from(ISAS), general=st.booleans(), threads=st.integers(0, 4))
def test_random_maps_images_and_kernels(seed, images, people, size, isa, general, threads):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (int(rng.integers(1, 50)), int(rng.integers(1, 50)), 3), dtype=np.uint8)
            for _ in range(images)]
    index = rng.integers(0, images, people)
    mats = np.stack([random_affine(rng, *imgs[k].shape[:2], size, general and rng.random() < 0.7) for k in index])
    flip = rng.random(people) < 0.5
    out = _C.crop_host(imgs, index, mats, size=size, flip=flip, mean=MEAN, std=STD, threads=threads, isa=isa)
    assert out.shape == (people, 3, size, size)
    for p in range(people):
        check32(out[p], reference(imgs[index[p]], mats[p], size, flip[p]))
    out16 = _C.crop_host(imgs, index, mats, size=size, flip=flip, mean=MEAN, std=STD, dtype="float16", isa=isa)
    assert out16.dtype == np.float16
    np.testing.assert_array_equal(out16, out.astype(np.float16))


def test_network_crop_of_a_photo_sized_image(rng):
    """256x256 crops of people boxes in a 4000x3000 image, crossing each edge and corner, tiny,
    huge and outside boxes; every kernel, float32 and float16."""
    img = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    boxes = [(-300, 1000, 900, 900), (3500, 1200, 1000, 1000), (1500, -200, 600, 700), (1800, 2700, 800, 600),
             (-100, -100, 400, 400), (3800, 2800, 500, 500), (100, 100, 3800, 2800), (2000, 1500, 3, 3),
             (5000, 100, 100, 100)]
    mats = np.stack([box_affine(x, y, w, h, 256) for x, y, w, h in boxes])
    refs = [reference(img, m, 256) for m in mats]
    for isa in ISAS:
        out = crop_normalize(img, None, mats, 256, isa=isa)
        out16 = crop_normalize(img, None, mats, 256, dtype="float16", isa=isa)
        for p in range(len(boxes)):
            check32(out[p], refs[p])
        np.testing.assert_array_equal(out16, out.astype(np.float16))
        np.testing.assert_allclose(out16.astype(np.float64), np.stack(refs), rtol=2**-11, atol=ATOL32)
    black = ((0 - MEAN) / STD)[:, None, None]
    np.testing.assert_allclose(out[8], np.broadcast_to(black, (3, 256, 256)), rtol=0, atol=ATOL32)


# ------------------------------------------------------------------------------ adversarial

@pytest.mark.parametrize("isa", ISAS)
def test_boxes_crossing_every_edge_tiny_and_huge(isa, rng):
    h, w, s = 37, 53, 24
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = []
    for x in (-10.3, -0.5, 0, w / 3, w - 10, w - 0.5, w + 2):
        for y in (-10.7, -0.5, 0, h / 3, h - 10, h - 0.5, h + 2):
            boxes.append((x, y, 12.4, 12.4))
    boxes += [(20.2, 10.1, 0.01, 0.01), (w - 1.0, h - 1.0, 0.5, 0.5), (-1e4, -1e4, 3e4, 3e4), (0, 0, w, h),
              (-0.5, -0.5, w, h), (3, 4, 1e-6, 1e-6)]
    mats = np.stack([box_affine(*b, s) for b in boxes])
    for flip in (False, True):
        out = _C.crop_host([img], np.zeros(len(boxes), np.int64), mats, size=s, flip=flip, mean=MEAN, std=STD,
                           isa=isa, threads=2)
        for p in range(len(boxes)):
            check32(out[p], reference(img, mats[p], s, flip))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 2)])
def test_one_and_two_pixel_images(isa, shape, rng):
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mats = np.stack([box_affine(-1, -1, shape[1] + 2, shape[0] + 2, 9), box_affine(0, 0, 1, 1, 5),
                     box_affine(-0.5, -0.5, shape[1], shape[0], 9), box_affine(0.2, 0.3, 0.5, 0.5, 9)])
    for s in (5, 9):
        mats_s = mats.copy()
        out = _C.crop_host([img], np.zeros(4, np.int64), mats_s, size=s, flip=np.array([0, 1, 0, 1], bool),
                           mean=MEAN, std=STD, isa=isa)
        for p in range(4):
            check32(out[p], reference(img, mats_s[p], s, bool(p % 2)))


@pytest.mark.parametrize("isa", ISAS)
def test_flip_mirrors_exactly(isa, rng):
    img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    rot = random_affine(rng, 64, 80, 33, general=True)
    mats = np.stack([box_affine(5.5, -3.2, 40, 50, 33), rot])
    a = _C.crop_host([img], [0, 0], mats, size=33, flip=False, mean=MEAN, std=STD, isa=isa)
    b = _C.crop_host([img], [0, 0], mats, size=33, flip=True, mean=MEAN, std=STD, isa=isa)
    np.testing.assert_array_equal(b, a[..., ::-1])


def test_kernels_agree(rng):
    img = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    mats = np.stack([box_affine(-20, 30, 150, 150, 256), box_affine(50, 50, 60, 80, 256)])
    outs = [_C.crop_host([img], [0, 0], mats, size=256, mean=MEAN, std=STD, isa=isa) for isa in ISAS]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=ATOL32)


@pytest.mark.parametrize("isa", ISAS)
def test_matches_cv2_warp_affine_within_the_stated_bound(isa, rng):
    """Against OpenCV: within 0.5 grey level + 1/64 of the local pixel difference per axis."""
    for trial in range(12):
        smooth = trial % 2 == 0
        h, w = (int(v) for v in rng.integers(20, 200, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if smooth:  # natural-image-like: neighbour differences of a few grey levels
            img = cv2.GaussianBlur(img, (0, 0), 3)
        s = int(rng.integers(8, 96))
        m = random_affine(rng, h, w, s, general=trial % 3 == 0)
        ours = _C.crop_host([img], [0], m[None], size=s, mean=MEAN, std=STD, isa=isa)[0]
        ours_grey = ours.transpose(1, 2, 0).astype(np.float64) * STD + MEAN
        theirs = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=(0, 0, 0)).astype(np.float64)
        padded = np.pad(img.astype(np.float64), ((2, 2), (2, 2), (0, 0)))
        gx = np.abs(np.diff(padded, axis=1)).max(-1)
        gy = np.abs(np.diff(padded, axis=0)).max(-1)
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
        v, u = np.mgrid[0:s, 0:s]
        xy = np.tensordot(inv[:2], np.stack([u, v, np.ones_like(u)]), 1)
        xi = np.clip(np.floor(xy[0]).astype(int) + 2, 0, w + 2)
        yi = np.clip(np.floor(xy[1]).astype(int) + 2, 0, h + 2)
        local_x = np.maximum.reduce([gx[np.clip(yi + dy, 0, h + 3), np.clip(xi + dx, 0, w + 2)]
                                     for dy in (-1, 0, 1, 2) for dx in (-1, 0, 1)])
        local_y = np.maximum.reduce([gy[np.clip(yi + dy, 0, h + 2), np.clip(xi + dx, 0, w + 3)]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1, 2)])
        # 0.05: OpenCV 4.x's 15-bit fixed-point weights (4 taps x 255 x 2^-15, rounded up).
        bound = 0.5 + (local_x + local_y) / 64 + 0.05
        diff = np.abs(ours_grey - theirs).max(-1)
        assert (diff <= bound).all(), f"trial {trial}: {diff.max():.3f} grey levels over the bound"
        if CV2_FLOAT_WARP:  # float positions in OpenCV: only the uint8 rounding remains
            assert diff.max() <= 0.5 + 1e-3


def check_rounded(got, image, m, size, flip=False):
    """round_pixels output: the float64 grey value rounded, or either neighbour where the value lies
    within 1e-4 of k + 1/2 (float32 interpolation cannot tell those ties apart)."""
    val = reference_values(image, m, size, flip)
    grey = got.astype(np.float64) * STD[:, None, None] + MEAN[:, None, None]
    err = np.abs(grey - np.rint(val))
    tie = np.abs(val - np.floor(val) - 0.5) < 1e-4
    ok = (err <= 1e-3) | (tie & (np.abs(grey - np.floor(val)) <= 1e-3)) | (tie & (np.abs(grey - np.ceil(val)) <= 1e-3))
    assert ok.all(), f"{(~ok).sum()} values off, worst {err[~ok].max():.3g} grey levels"


@pytest.mark.parametrize("isa", ISAS)
def test_round_pixels(isa, rng):
    for trial in range(10):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        s = int(rng.integers(1, 40))
        mats = np.stack([random_affine(rng, h, w, s, general=trial % 3 == 0) for _ in range(3)])
        flip = rng.random(3) < 0.5
        out = _C.crop_host([img], [0, 0, 0], mats, size=s, flip=flip, mean=MEAN, std=STD, round_pixels=True, isa=isa)
        out16 = _C.crop_host([img], [0, 0, 0], mats, size=s, flip=flip, mean=MEAN, std=STD, round_pixels=True,
                             isa=isa, dtype="float16")
        np.testing.assert_array_equal(out16, out.astype(np.float16))
        for p in range(3):
            check_rounded(out[p], img, mats[p], s, flip[p])
        # The same crops as OpenCV's uint8 warp but at ties.
        theirs = np.stack([cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                          borderValue=(0, 0, 0)) for m in mats]).astype(np.float64)
        theirs[flip] = theirs[flip][:, :, ::-1]
        grey = out.astype(np.float64).transpose(0, 2, 3, 1) * STD + MEAN
        if CV2_FLOAT_WARP:
            diff = np.abs(grey - theirs)
            assert diff.max() <= 1 + 1e-3 and (diff > 1e-3).mean() <= 1e-3


def test_round_pixels_reproduces_upstream_crops_and_joints():
    """Upstream's golden XS data (tests/data/golden): its crops are cv2 uint8 warps. Rounded fused
    crops equal them but at float32 ties (measured: 23 of 983,040 values, one grey level each);
    through upstream's network (golden checkpoint) and the decode, the joints stay within upstream's
    tolerances plus what those ties move: measured 6.4e-4 cells, 0.0095 px, 0.023 mm against the
    joints of the golden crops, so 2e-3 cells, 0.03 px, 0.1 mm (3x). Unrounded crops move the joints of
    this random-weight network by up to 0.04 cells / 0.44 px: the tolerance would have to be 50x."""
    from pathlib import Path

    torch = pytest.importorskip("torch")
    from cnpose_trt.nn.model import build_model
    from cnpose_trt.ops.decoding import decode

    golden = Path(__file__).parent / "data" / "golden"
    g = dict(np.load(golden / "upstream_golden_xs.npz"))
    grey_step = 1 / STD.min()
    for flip, key in ((False, "network_input"), (True, "network_input_flipped")):
        x = crop_normalize(g["image_rgb"], None, g["crop_affine"], 256, flip=flip, round_pixels=True)
        diff = np.abs(x.astype(np.float64) - g[key])
        off = diff > 1e-3
        assert off.mean() <= 1e-4 and diff.max() <= grey_step + 1e-3
    with warnings.catch_warnings():  # build_model warns about the random-weight checkpoint's origin
        warnings.simplefilter("ignore")
        model = build_model("XS", golden / "snapshot_xs_random.pth.tar").eval()
    x = crop_normalize(g["image_rgb"], None, g["crop_affine"], 256, round_pixels=True)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
        want = model(torch.from_numpy(g["network_input"])).numpy()
    kw = dict(boxes=g["crop_boxes"], root_depth=[float(g["root_depth"])] * 5, intrinsics=g["intrinsics"])
    a, b = decode(got, 18, 32, **kw), decode(want, 18, 32, **kw)
    assert np.abs(a.cells - b.cells).max() <= 2e-3
    assert np.abs(a.image[..., :2] - b.image[..., :2]).max() <= 0.03
    assert np.abs(a.image[..., 2] - b.image[..., 2]).max() <= 0.1
    np.testing.assert_allclose(a.cells, g["cells"], rtol=0, atol=2e-3 + 6e-4)


def test_huge_image_over_2_to_31_bytes(rng):
    """A 27000 x 27000 image (2.19e9 bytes) cropped near its bottom-right corner (issue 10, item 8).
    np.zeros maps pages lazily: only the rows written and read are touched."""
    big = np.zeros((27000, 27000, 3), np.uint8)
    assert big.nbytes > 2**31
    patch = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big[26700:, 26700:] = patch
    mats = np.stack([box_affine(26800.3, 26850.7, 400, 400, 64), box_affine(26700, 26700, 300, 300, 64),
                     box_affine(-50, 26990, 200, 200, 64)])
    for isa in ISAS:
        out = _C.crop_host([big], [0, 0, 0], mats, size=64, mean=MEAN, std=STD, isa=isa)
        sub = big[26600:, 26600:]  # the reference on the part the crops read (zeros elsewhere)
        for p in range(2):
            shifted = mats[p].copy()
            shifted[:, 2] += mats[p][:, :2] @ [26600, 26600]
            check32(out[p], reference(sub, shifted, 64))
        corner = big[26900:, :300]
        shifted = mats[2].copy()
        shifted[:, 2] += mats[2][:, :2] @ [0, 26900]
        check32(out[2], reference(corner, shifted, 64))


def test_strided_views_and_channel_order(rng):
    img = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    view = img[7:50, 9:61]  # rows strided by the full image: used in place
    m = box_affine(-3, 4.5, 40, 40, 32)
    check32(_C.crop_host([view], [0], m[None], size=32, mean=MEAN, std=STD)[0], reference(view, m, 32))
    bgr_view = img[..., ::-1]  # channel stride -1: the binding refuses it, crop_normalize copies it
    with pytest.raises(ValueError, match=r"images\[0\] must have interleaved RGB pixels"):
        _C.crop_host([bgr_view], [0], m[None], size=32, mean=MEAN, std=STD)
    check32(crop_normalize([bgr_view], [0], m[None], 32)[0], reference(np.ascontiguousarray(bgr_view), m, 32))


def test_several_images_torch_io_and_zero_people(rng):
    torch = pytest.importorskip("torch")
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 30), (25, 90), (1, 1))]
    index = np.array([2, 0, 1, 1, 0])
    mats = np.stack([box_affine(*rng.uniform(-10, 20, 2), *rng.uniform(5, 40, 2), 16) for _ in index])
    res = crop_normalize([torch.from_numpy(i) for i in imgs], torch.from_numpy(index), mats, 16)
    assert isinstance(res, torch.Tensor) and res.shape == (5, 3, 16, 16)
    for p, k in enumerate(index):
        check32(res[p].numpy(), reference(imgs[k], mats[p], 16))
    out = torch.empty(5, 3, 16, 16, dtype=torch.float16)
    assert crop_normalize(imgs, index, mats, 16, out=out) is out
    np.testing.assert_array_equal(out.numpy(), res.numpy().astype(np.float16))
    stacked = np.stack([imgs[0]] * 2)  # (N, H, W, 3): one image per leading index
    check32(crop_normalize(stacked, [1], mats[:1], 16)[0], reference(imgs[0], mats[0], 16))
    empty = crop_normalize(imgs, [], [], 16)
    assert empty.shape == (0, 3, 16, 16)


def test_numpy_fallback_matches_compiled(monkeypatch, rng):
    """Without the extension (or for float images) crop_normalize keeps the contract through cv2."""
    import cnpose_trt.ops.cropping as cropping

    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    mats = np.stack([box_affine(-20, 10, 90, 90, 64), box_affine(100, 80, 90, 70, 64), random_affine(rng, 120, 160, 64, True)])
    flip = np.array([False, True, True])
    compiled = crop_normalize(img, None, mats, 64, flip=flip)
    as_float = crop_normalize(img.astype(np.float32), None, mats, 64, flip=flip)
    np.testing.assert_allclose(as_float, compiled, atol=0.01)
    monkeypatch.setattr(cropping, "_compiled", lambda: None)
    fallback = crop_normalize(img, None, mats, 64, flip=flip, dtype=np.float16)
    assert fallback.dtype == np.float16
    # cv2 rounds uint8 crops to integers: half a grey level, in normalised units 0.5 / std; plus
    # float16's rounding (half an ulp, 2^-11 relative).
    np.testing.assert_allclose(fallback, compiled, rtol=2**-11, atol=0.5 / STD.min() + 0.01)
    big = np.zeros((27000, 27000, 3), np.uint8)  # over 2^31 bytes: the fallback must not crash either
    big[-40:, -40:] = img[:40, :40]
    m = box_affine(26970, 26970, 40, 40, 16)
    fb = crop_normalize(big, None, m[None], 16)
    np.testing.assert_allclose(fb[0], reference(big[-60:, -60:], m @ np.array([[1, 0, 26940], [0, 1, 26940], [0, 0, 1]]), 16),
                               atol=0.5 / STD.min() + 0.01)


# --------------------------------------------------------------------- threads (issue 10, item 9)

def test_refused_threads_mean_fewer_threads(rng):
    img = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    mats = np.stack([box_affine(i, i, 30, 30, 32) for i in range(8)])
    want = _C.crop_host([img], np.zeros(8, np.int64), mats, size=32, mean=MEAN, std=STD, threads=1)
    try:
        for limit in (0, 1):
            _C._set_thread_spawn_limit(limit)
            for threads in (0, 3, 40000):
                got = _C.crop_host([img], np.zeros(8, np.int64), mats, size=32, mean=MEAN, std=STD, threads=threads)
                np.testing.assert_array_equal(got, want)
    finally:
        _C._set_thread_spawn_limit(-1)


def test_thread_creation_failure_under_an_address_space_limit():
    """A real refusal: under RLIMIT_AS at most one 8 MB thread stack fits; the crop and the decode must still
    finish on the threads they get (they used to abort: 'terminate called without an active exception')."""
    code = textwrap.dedent("""
        import resource, numpy as np
        from cnpose_trt import _C
        img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        mats = np.tile(np.array([[[2.0, 0, 0], [0, 2.0, 0]]]), (64, 1, 1))
        hm = np.random.default_rng(1).standard_normal((64, 18 * 2, 4, 4)).astype(np.float32)
        want_c = _C.crop_host([img], np.zeros(64, np.int64), mats, size=32, mean=[0, 0, 0], std=[1, 1, 1], threads=1)
        want_d = _C.decode_host(hm, 18, threads=1)
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + 12 * 2**20, resource.RLIM_INFINITY))
        got_c = _C.crop_host([img], np.zeros(64, np.int64), mats, size=32, mean=[0, 0, 0], std=[1, 1, 1], threads=500)
        got_d = _C.decode_host(hm, 18, threads=500)
        assert (got_c == want_c).all() and np.array_equal(got_d, want_d, equal_nan=True)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ------------------------------------------------------------------------------- bad input

IMG = np.zeros((8, 8, 3), np.uint8)
M1 = box_affine(0, 0, 8, 8, 4)[None]


def crop(**kw):
    args = dict(images=[IMG], image_index=[0], affines=M1, size=4, mean=MEAN, std=STD)
    args.update(kw)
    return _C.crop_host(args.pop("images"), args.pop("image_index"), args.pop("affines"), **args)


@pytest.mark.parametrize("kw, error, message", [
    (dict(images=IMG), TypeError, r"images must be a list of \(H, W, 3\) uint8 numpy arrays"),
    (dict(images=[[1, 2, 3]]), TypeError, r"images\[0\] must be a numpy array \(H, W, 3\) uint8, got list"),
    (dict(images=[IMG.astype(np.float32)]), TypeError, r"images\[0\] must be uint8 RGB, got float32"),
    (dict(images=[np.zeros((8, 8, 4), np.uint8)]), ValueError, r"images\[0\] must have shape \(H, W, 3\) RGB, got \(8, 8, 4\)"),
    (dict(images=[np.zeros((8, 8), np.uint8)]), ValueError, r"images\[0\] must have shape \(H, W, 3\)"),
    (dict(images=[np.zeros((0, 8, 3), np.uint8)]), ValueError, r"images\[0\] must not be empty"),
    (dict(images=[IMG[:, ::2]]), ValueError, r"images\[0\] must have interleaved RGB pixels"),
    (dict(images=[IMG[::-1]]), ValueError, r"images\[0\] must have a row stride of at least"),
    (dict(image_index=[0.0]), TypeError, r"image_index must be an integer array of shape \(P,\)"),
    (dict(image_index=[[0]]), ValueError, r"image_index must have shape \(P,\), got 2 dimensions"),
    (dict(image_index=[1]), ValueError, r"image_index\[0\] = 1 is not an index of the 1 images"),
    (dict(image_index=[-1]), ValueError, r"image_index\[0\] = -1"),
    (dict(affines=np.zeros((1, 3, 3))), ValueError, r"affines must have shape \(1, 2, 3\), got \(1, 3, 3\)"),
    (dict(affines=np.zeros((2, 2, 3))), ValueError, r"affines must have shape \(1, 2, 3\)"),
    (dict(affines=[[[1, 0, np.nan], [0, 1, 0]]]), ValueError, "affines must be finite"),
    (dict(affines=[[[1, 2, 0], [2, 4, 0]]]), ValueError, r"affines\[0\] is not invertible"),
    (dict(affines=[[[1e-12, 0, 0], [0, 1, 0]]]), ValueError, r"affines\[0\] maps crop corner .* beyond \+-2\^30"),
    (dict(affines="x"), TypeError, r"affines must be a numeric array of shape \(1, 2, 3\)"),
    (dict(size=0), ValueError, r"size must be an integer in 1..16384, got 0"),
    (dict(size=20000), ValueError, "size must be an integer in 1..16384"),
    (dict(flip=[True, False]), ValueError, r"flip must have shape \(1,\)"),
    (dict(flip=np.array([1])), TypeError, "flip must be a bool or a bool array"),
    (dict(mean=[0, 0]), ValueError, r"mean must have shape \(3,\), got \(2,\)"),
    (dict(std=[1, 0, 1]), ValueError, "std must be positive, got 0 for channel 1"),
    (dict(std=[1, np.inf, 1]), ValueError, "std must be finite"),
    (dict(out=np.zeros((1, 3, 4, 5), np.float32)), ValueError, r"out must have shape \(1, 3, 4, 4\) \(P, 3, size, size\)"),
    (dict(out=np.zeros((1, 3, 4, 4), np.float64)), TypeError, "out must be float32 or float16, got float64"),
    (dict(out=np.zeros((1, 3, 4, 4), ">f4")), TypeError, "out must be in the machine's byte order"),
    (dict(out=np.zeros((1, 3, 4, 8), np.float32)[..., ::2]), ValueError, "out must be C-contiguous and writeable"),
    (dict(out=np.zeros((1, 3, 4, 4), np.float32), dtype="float16"), ValueError, "dtype='float16' does not match"),
    (dict(dtype="int8"), TypeError, "dtype must be float32 or float16, got int8"),
    (dict(isa="neon"), ValueError, "isa must be"),
    (dict(threads=-2), ValueError, "threads must be >= 0"),
])
def test_bad_input(kw, error, message):
    with pytest.raises(error, match=message):
        crop(**kw)


def test_out_must_not_overlap_an_image():
    buf = np.zeros(3 * 4 * 4 * 4 + 8 * 8 * 3, np.uint8)
    img = buf[:8 * 8 * 3].reshape(8, 8, 3)
    out = buf[: 3 * 4 * 4 * 4].view(np.float32).reshape(1, 3, 4, 4)
    with pytest.raises(ValueError, match="out must not overlap images"):
        crop(images=[img], out=out)
    ro = np.zeros((1, 3, 4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        crop(out=ro)


@pytest.mark.parametrize("call, error, message", [
    (lambda: crop_normalize("img", [0], M1), TypeError, "images must be a list"),
    (lambda: crop_normalize(np.zeros((2, 3)), [0], M1), ValueError, r"images must be \(H, W, 3\), \(N, H, W, 3\)"),
    (lambda: crop_normalize([IMG, IMG], None, M1), ValueError, "image_index may be left out only with one image"),
    (lambda: crop_normalize([IMG], [0], M1, 4.0), TypeError, "size must be an integer"),
    (lambda: crop_normalize([IMG], [0], M1, 4, dtype="int8"), TypeError, "dtype must be float32 or float16"),
    (lambda: crop_normalize([IMG], [0], M1, 4, flip=[1]), TypeError, "flip must be a bool or a bool array"),
    (lambda: crop_normalize([IMG], [0], M1, 4, threads=1.5), TypeError, "threads must be an integer"),
    (lambda: crop_normalize([IMG], [0], M1, 4, out=[0]), TypeError, "out must be a numpy array or a CPU torch tensor"),
])
def test_bad_input_python_api(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(_C.built_with_cuda, reason="this build has CUDA")
def test_cuda_request_without_cuda_build():
    from cnpose_trt.ops.decoding import DeviceArray

    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.crop_device([1 << 20], [(8, 8)], [24], [0], M1, size=4, mean=MEAN, std=STD, out=1 << 21)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        crop_normalize([DeviceArray(1 << 20, (8, 8, 3), "uint8")], [0], M1, 4)
