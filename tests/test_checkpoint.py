import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (the export extra)")
from conftest import make_model, write_official

from cnpose_trt import VARIANTS, CheckpointError, custom_spec, detect_variant
from cnpose_trt.cli.app import main as cli
from cnpose_trt.nn.checkpoint import detect_spec, load_checkpoint, save_checkpoint, weights_sha256
from cnpose_trt.nn.model import build_model


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


def test_empty_and_folder_checkpoints(tmp_path, capsys):
    """Issue 10, item 4: an empty file was an IndexError."""
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty \\(0 bytes\\)"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        load_checkpoint(tmp_path)
    assert cli(["inspect", str(tmp_path / "empty.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value, capsys):
    """Issue 10, item 10: NaN/inf weights built an engine whose joints were all NaN."""
    from cnpose_trt.build.builder import build_engine

    model = make_model("XS")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.deconv_layers_2.dwconv.weight"][3, 0, 1, 1] = value
    state["backbone.stages.2.4.pwconv1.bias"][:7] = value
    message = (r"non-finite weights \(NaN or inf\) in backbone.stages.2.4.pwconv1.bias \(7 of 640 values\), "
               r"head.deconv_layers_2.dwconv.weight \(1 of 1152 values\)")
    with pytest.raises(CheckpointError, match=message):
        build_model("XS", state)
    path = tmp_path / "diverged.pth"
    torch.save({"network": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        build_engine(checkpoint=path, out_dir=tmp_path / "e", backend="torch")
    assert not list((tmp_path / "e").glob("*.pt"))
    assert cli(["inspect", str(path)]) == 2
    assert "head.deconv_layers_2.dwconv.weight" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_weights_are_refused(tmp_path, dtype):
    """Issue 10, item 10: int64 weights were cast to float silently."""
    state = {k: v.clone() for k, v in make_model("XS").state_dict().items()}
    weight = state["head.final_layer.weight"]
    state["head.final_layer.weight"] = (weight * 100).to(dtype)
    assert state["backbone.norm.num_batches_tracked"].dtype == torch.int64  # integer by nature: allowed
    with pytest.raises(CheckpointError, match=rf"weights must be floating point, found head.final_layer.weight "
                                              rf"\({str(dtype).replace('torch.', '')}\)"):
        build_model("XS", state)
    state["head.final_layer.weight"] = weight.to(torch.float16)  # floats of any width load
    build_model("XS", state)


def test_flipped_bytes_never_load_silently(tmp_path):
    """Issue 10, item 10: one flipped byte loaded silently; the zip's CRC-32s catch it. Wherever the
    byte is, the file is refused or (a byte outside every checksum, e.g. alignment padding) loads
    exactly the original weights."""
    import zipfile

    import numpy as np

    path = write_official(tmp_path / "good.tar", make_model("XS", seed=4))
    original, _ = load_checkpoint(path)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        big = max(zf.infolist(), key=lambda i: i.file_size)
    start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
    rng = np.random.default_rng(0)
    offsets = [start + big.file_size // 2, *rng.integers(0, len(data), 24)]
    refused = 0
    for offset in offsets:
        flipped = bytearray(data)
        flipped[offset] ^= 1 << int(rng.integers(8))
        bad = tmp_path / "flipped.tar"
        bad.write_bytes(bytes(flipped))
        try:
            state, _ = load_checkpoint(bad)
        except CheckpointError as exc:
            refused += 1
            assert "\n" not in str(exc)
            continue
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state), offset
    assert refused >= len(offsets) // 2
    flipped = bytearray(data)
    flipped[offsets[0]] ^= 0x10
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"is damaged: Bad CRC-32 for file .*download or save it again"):
        load_checkpoint(bad)


def test_inspect_refuses_a_layer_that_contradicts_the_variant(tmp_path, capsys):
    """Issue 10, item 10: a final conv of 3x3 was reported as 'matches variant XS'."""
    state = {k: v.clone() for k, v in make_model("XS").state_dict().items()}
    state["head.final_layer.weight"] = torch.zeros(576, 128, 3, 3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    message = r"contradicts 1 tensor shape\(s\): head.final_layer.weight: expected \(576, 128, 1, 1\), found " \
              r"\(576, 128, 3, 3\)"
    with pytest.raises(CheckpointError, match=message):
        detect_spec(state)
    assert cli(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert "matches variant" not in captured.out and "head.final_layer.weight" in captured.err
    state = {k: v.clone() for k, v in make_model("M").state_dict().items()}
    state["backbone.stages.1.2.dwconv.weight"] = torch.zeros(96, 1, 5, 5)
    with pytest.raises(CheckpointError, match=r"backbone.stages.1.2.dwconv.weight: expected \(96, 1, 7, 7\)"):
        detect_variant(state)
