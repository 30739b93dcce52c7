import pytest
import torch
from conftest import make_model, write_official

from cnpose_trt import VARIANTS, CheckpointError, custom_spec, detect_variant
from cnpose_trt.checkpoint import detect_spec, load_checkpoint, save_checkpoint, weights_sha256
from cnpose_trt.cli import main as cli
from cnpose_trt.model import build_model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_detect_every_variant_from_official_file(tmp_path, name):
    model = make_model(name, seed=3)
    path = write_official(tmp_path / f"snapshot_{name}.pth.tar", model)
    state, stored = load_checkpoint(path)
    assert stored is None and not any(k.startswith("module.") for k in state)
    assert detect_variant(state) == name
    loaded = build_model(name, path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_plain_and_own_format(tmp_path):
    model = make_model("S", seed=5)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    assert detect_variant(load_checkpoint(tmp_path / "plain.pth")[0]) == "S"
    spec = custom_spec("XS", name="XS-3UP", head_upsample=(True, True, True), depth_dim=64)
    custom = make_model(spec)
    save_checkpoint(custom, tmp_path / "own.pt")
    state, stored = load_checkpoint(tmp_path / "own.pt")
    assert stored == spec
    detected = detect_variant(state)
    assert not isinstance(detected, str) and detected.same_architecture(spec)
    assert weights_sha256(build_model(spec, tmp_path / "own.pt").state_dict()) == weights_sha256(custom.state_dict())


def test_mislabelled_file_is_detected_and_refused(tmp_path):
    path = write_official(tmp_path / "ConvNeXtPose_L.tar", make_model("S"))  # named L, holds S
    assert detect_variant(load_checkpoint(path)[0]) == "S"
    with pytest.raises(CheckpointError) as info:
        build_model("L", path)
    msg = str(info.value)
    assert "holds weights of S, not of variant L" in msg
    assert "head.deconv_layers_1.pwconv.weight: expected (512, 384, 1, 1), found (256, 384, 1, 1)" in msg


def test_two_up_into_three_up_names_the_tensor(tmp_path):
    path = write_official(tmp_path / "m.tar", make_model("XS"))
    with pytest.raises(CheckpointError, match=r"holds weights of XS, not of variant M: backbone.downsample_layers"):
        build_model("M", path)


def test_missing_and_unknown_keys_are_listed(tmp_path):
    state = make_model("XS").state_dict()
    del state["head.final_layer.bias"]
    state["head.extra.weight"] = torch.zeros(3)
    expected = r"missing keys: head.final_layer.bias; unexpected keys: head.extra.weight"
    with pytest.raises(CheckpointError, match=expected):
        build_model("XS", state)


def test_truncated_missing_and_garbage_files(tmp_path):
    path = write_official(tmp_path / "full.tar", make_model("XS"))
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, damaged or not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.tar")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_model("XS", tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pth")
    torch.save({"epoch": 1}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="entries that are not named tensors|holds no state_dict"):
        load_checkpoint(tmp_path / "nostate.pth")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="missing backbone.downsample_layers.0.0.weight"):
        detect_spec(load_checkpoint(tmp_path / "other.pth")[0])


def test_non_cubic_volume_needs_explicit_flags():
    state = make_model(custom_spec("XS", head_upsample=(True, False, False), depth_dim=48)).state_dict()
    with pytest.raises(CheckpointError, match="pass head_upsample explicitly"):
        detect_spec(state)
    assert detect_spec(state, head_upsample=(True, False, False)).depth_dim == 48


def test_inspect_cli(tmp_path, capsys):
    path = write_official(tmp_path / "ConvNeXtPose_XS.tar", make_model("M"))
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "matches variant: M" in out and "7,587,008 learnable" in out and "7,596,960 with BatchNorm" in out
    assert "3UP-256ch-D64" in out
    assert cli(["inspect", str(tmp_path / "missing.tar")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
