import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (the export extra)")

from cnpose_trt.ops.decoding import soft_argmax_reference, soft_argmax_torch


def torch_reference(heatmaps, joints, depth_dim):
    """The upstream formulation in float64: an implementation independent of the NumPy oracle."""
    coords, conf = soft_argmax_torch(torch.from_numpy(heatmaps).double(), joints, depth_dim)
    return coords.numpy(), conf.numpy()


@pytest.mark.parametrize("shape", [(2, 18, 4, 5, 6), (3, 18, 32, 32, 32), (1, 5, 7, 3, 9)])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_matches_upstream_formulation(rng, shape, scale):
    n, j, d, h, w = shape
    hm = (rng.standard_normal((n, j * d, h, w)) * scale).astype(np.float32)
    coords, conf = soft_argmax_reference(hm, j, d)
    ref, ref_conf = torch_reference(hm, j, d)
    np.testing.assert_allclose(coords, ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(conf, ref_conf, rtol=1e-10)


def test_single_hot_voxel_at_corners():
    j, d, h, w = 2, 4, 5, 6
    for (zz, yy, xx) in [(0, 0, 0), (d - 1, h - 1, w - 1), (0, h - 1, 0), (d - 1, 0, w - 1)]:
        hm = np.full((1, j * d, h, w), -1e4, np.float32)
        hm[0, 1 * d + zz, yy, xx] = 1e4
        hm[0, 0 * d + 0, 0, 0] = 5.0  # joint 0: hot at origin
        coords, conf = soft_argmax_reference(hm, j, d)
        np.testing.assert_array_equal(coords[0, 1], [xx, yy, zz])
        np.testing.assert_array_equal(coords[0, 0], [0, 0, 0])
        assert conf[0, 1] == 1.0


def test_ties_uniform_and_huge_logits():
    hm = np.full((1, 18 * 2, 3, 5), 1e4, np.float32)
    coords, conf = soft_argmax_reference(hm, 18, 2)
    np.testing.assert_allclose(coords[0], np.tile([2.0, 1.0, 0.5], (18, 1)), rtol=1e-12)
    np.testing.assert_allclose(conf, 1 / 30, rtol=1e-12)
    hm = np.zeros((1, 2, 2, 2), np.float32)
    hm[0, :, 0, 0] = 1e4
    hm[0, :, 1, 1] = 1e4  # two tied peaks
    coords, _ = soft_argmax_reference(hm, 1, 2)
    np.testing.assert_allclose(coords[0, 0], [0.5, 0.5, 0.5])


def test_nan_inf_rules():
    hm = np.random.default_rng(0).standard_normal((1, 4 * 2, 3, 3)).astype(np.float32)
    hm[0, 0, 1, 1] = np.nan  # joint 0
    hm[0, 2:4] = -np.inf  # joint 1: no mass at all
    hm[0, 4, 0, 0] = np.inf  # joint 2
    hm[0, 6, 0, 0] = -np.inf  # joint 3: one -inf voxel is simply p = 0
    coords, conf = soft_argmax_reference(hm, 4, 2)
    assert np.isnan(coords[0, :3]).all() and np.isnan(conf[0, :3]).all()
    assert np.isfinite(coords[0, 3]).all() and 0 < conf[0, 3] < 1


@pytest.mark.parametrize("args, error, message", [
    ((np.zeros((2, 36, 4)),), ValueError, "4 dimensions"),
    ((np.zeros((1, 35, 4, 4)),), ValueError, "divisible by joints"),
    ((np.zeros((1, 36, 4, 4)), 18, 3), ValueError, "depth_dim"),
    ((np.zeros((1, 36, 4, 4), np.int32),), TypeError, "float32, float16"),
    (([[1.0]],), TypeError, "numpy array"),
    ((np.zeros((0, 36, 4, 4)),), ValueError, "must not be empty"),
    ((np.zeros((1, 36, 4, 4)), 0), ValueError, "joints must be a positive integer"),
])
def test_bad_heatmaps(args, error, message):
    with pytest.raises(error, match=message):
        soft_argmax_reference(*args)
