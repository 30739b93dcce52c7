import dataclasses

import pytest

from cnpose_trt import VARIANTS, VariantSpec, custom_spec, get_spec
from cnpose_trt.spec import FLIP_PAIRS, JOINT_NAMES, SKELETON, match_variant, upsample_flags_for

EXPECTED = {  # variant: (head_upsample, depth_dim, heatmap shape per image, head tag)
    "XS": ((True, True, False), 32, (576, 32, 32), "2UP-128ch-D32"),
    "S": ((True, True, False), 32, (576, 32, 32), "2UP-256ch-D32"),
    "M": ((True, True, True), 64, (1152, 64, 64), "3UP-256ch-D64"),
    "L": ((True, True, True), 64, (1152, 64, 64), "3UP-512ch-D64"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_variant_table(name):
    spec = VARIANTS[name]
    flags, d, shape, tag = EXPECTED[name]
    assert spec.head_upsample == flags and spec.depth_dim == d
    assert spec.heatmap_shape == shape and spec.head_tag == tag
    assert spec.joints == 18 and spec.input_shape == (3, 256, 256)
    assert get_spec(name.lower()) is spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.depth_dim = 1


def test_joint_facts():
    assert len(JOINT_NAMES) == 18 and JOINT_NAMES[0] == "Pelvis" and JOINT_NAMES[17] == "Thorax"
    assert len(SKELETON) == 16
    flat = [j for pair in FLIP_PAIRS for j in pair]
    assert len(set(flat)) == 12
    for a, b in FLIP_PAIRS:
        assert {JOINT_NAMES[a][:2], JOINT_NAMES[b][:2]} == {"L_", "R_"}
        assert JOINT_NAMES[a][2:] == JOINT_NAMES[b][2:]


def test_custom_head():
    spec = custom_spec("XS", name="XS-3UP", head_upsample=(True, True, True), depth_dim=64)
    assert spec.heatmap_shape == (1152, 64, 64) and spec.head_tag == "3UP-128ch-D64"
    assert match_variant(spec) is None
    # An S backbone with a 3UP head and depth_dim 64 is exactly M.
    assert match_variant(custom_spec("S", head_upsample=(True, True, True), depth_dim=64)) == "M"
    assert match_variant(custom_spec("M", name="x")) == "M"
    assert VariantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("changes, message", [
    ({"head_upsample": (True, True)}, "head_upsample must have 3 entries"),
    ({"head_upsample": (True, 1, False)}, "booleans"),
    ({"depth_dim": 0}, "depth_dim must be a positive integer"),
    ({"depth_dim": 2.5}, "depth_dim"),
    ({"depths": (3, 3, 9)}, "depths must have 4 entries"),
    ({"dims": (48, 96, -192, 384)}, "dims must hold positive integers"),
    ({"head_channels": 0}, "head_channels"),
    ({"joints": True}, "joints"),
    ({"input_size": 250}, "multiple of 32"),
])
def test_bad_custom_spec(changes, message):
    with pytest.raises(ValueError, match=message):
        custom_spec("S", **changes)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of XS, S, M, L"):
        get_spec("XL")
    with pytest.raises(TypeError, match="variant must be"):
        get_spec(3)
    with pytest.raises(ValueError, match="unknown variant spec fields"):
        VariantSpec.from_dict({**VARIANTS["M"].to_dict(), "bogus": 1})


def test_upsample_flags_from_volume():
    assert upsample_flags_for(32) == (True, True, False)
    assert upsample_flags_for(64) == (True, True, True)
    assert upsample_flags_for(8) == (False, False, False)
    with pytest.raises(ValueError, match="pass head_upsample explicitly"):
        upsample_flags_for(48)
