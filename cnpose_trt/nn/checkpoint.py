"""Checkpoints: read official snapshots, plain state_dicts and this package's files.

The variant is read from tensor shapes, never from a file name: files in the wild are
mislabelled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, need_torch
from ..spec import NUM_HEAD_LAYERS, VariantSpec, match_variant, upsample_flags_for

FORMAT_KEY = "cnpose_trt_format"
FORMAT_VERSION = 1
_STAGE_KEY = re.compile(r"^backbone\.stages\.(\d+)\.(\d+)\.")


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in tensor.shape)


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Any], VariantSpec | None]:
    """(state_dict without 'module.' prefixes, spec stored in the file or None)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, found {type(obj).__name__}")
    spec = None
    if FORMAT_KEY in obj:
        try:
            spec = VariantSpec.from_dict(obj["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid cnpose_trt spec: {exc}") from None
        state = obj.get("state_dict")
    elif "network" in obj:  # official training snapshot {'epoch', 'network', 'optimizer'}
        state = obj["network"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: holds no state_dict (keys: {sorted(map(str, obj))[:8]})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not hasattr(v, "shape")]
    if bad:
        raise CheckpointError(f"{source}: entries that are not named tensors: {bad[:5]}")
    state = _strip_module(state)
    check_weights(state, source)
    return state, spec


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def check_weights(state: Mapping[str, Any], source: str = "state_dict") -> None:
    """Refuse weights that would load silently into a broken network, naming the tensors.

    Every tensor must be floating point (BatchNorm's integer num_batches_tracked excepted):
    an integer tensor would be cast to float without a word. No value may be NaN or infinite:
    the network's outputs would be NaN.

    Raises:
        CheckpointError: the tensors at fault, with their dtype or non-finite count.
    """
    wrong_type, non_finite = [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if hasattr(value, "is_floating_point"):  # torch: bfloat16 has no numpy dtype
            floating, dtype = value.is_floating_point(), str(value.dtype).replace("torch.", "")
        else:
            dtype = str(np.asarray(value).dtype)
            floating = np.asarray(value).dtype.kind == "f"
        if not floating:
            wrong_type.append(f"{key} ({dtype})")
            continue
        if hasattr(value, "isfinite"):
            bad = int((~value.isfinite()).sum())
        else:
            bad = int((~np.isfinite(_as_numpy(value))).sum())
        if bad:
            non_finite.append(f"{key} ({bad} of {int(np.prod(_shape(value)))} values)")
    if wrong_type:
        raise CheckpointError(f"{source}: weights must be floating point, found {list_items(wrong_type)}; "
                              "a ConvNeXtPose or RootNet checkpoint holds float tensors (only num_batches_tracked "
                              "counts are integers)")
    if non_finite:
        raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {list_items(non_finite)}; the file is "
                              "damaged or comes from a diverged training run")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _verify_zip(path: Path) -> None:
    """Read every member of a zip-format checkpoint so that zipfile checks its CRC-32s: torch.load
    does not, and a flipped bit in a weight would load silently."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format has no checksums; torch.load judges it
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {_first_line(exc)} (the zip's checksums do not "
                              "match its contents); download or save it again") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], VariantSpec | None]:
    """Read a checkpoint file with torch.load(weights_only=True).

    Returns:
        (state_dict with 'module.' stripped, the spec the file records or None).

    Raises:
        CheckpointError: missing, truncated or otherwise unreadable file.
        TorchMissingError: torch cannot be imported.
    """
    need_torch("reading a checkpoint")
    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes): not a PyTorch checkpoint")
        _verify_zip(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {_first_line(exc)}); "
            "the file is truncated, damaged or not a PyTorch checkpoint") from None
    return unwrap_state_dict(obj, str(path))


def _need(state: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a ConvNeXtPose state_dict: missing {key}")
    shape = _shape(state[key])
    if len(shape) != ndim:
        raise CheckpointError(f"not a ConvNeXtPose state_dict: {key} has shape {shape}, expected {ndim} dims")
    return shape


def detect_spec(state: Mapping[str, Any], joints: int = 18,
                head_upsample: tuple[bool, bool, bool] | None = None) -> VariantSpec:
    """Read the architecture from tensor shapes.

    Dims come from the downsampling convs, depths from the stage block indices, head channels
    from the first head 1x1 conv, depth_dim from the final conv (joints * depth_dim outputs).
    Which head layers upsample is not visible in weights; unless given, it follows from the
    volume being cubic (H = W = depth_dim).
    """
    state = _strip_module(state)
    if network_of(state) == "RootNet":
        raise CheckpointError("not a ConvNeXtPose state_dict: it holds RootNet weights (ResNet-50 backbone.layer*, "
                              "root.*); RootNet checkpoints are given as RootNet's")
    stem = _need(state, "backbone.downsample_layers.0.0.weight", 4)
    dims = [stem[0]]
    for i in range(1, 4):
        dims.append(_need(state, f"backbone.downsample_layers.{i}.1.weight", 4)[0])
    depths = [0, 0, 0, 0]
    for key in state:
        m = _STAGE_KEY.match(key)
        if m and int(m.group(1)) < 4:
            depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
    head_channels = _need(state, "head.deconv_layers_1.pwconv.weight", 4)[0]
    for k in range(2, NUM_HEAD_LAYERS + 1):
        _need(state, f"head.deconv_layers_{k}.pwconv.weight", 4)
    out_ch = _need(state, "head.final_layer.weight", 4)[0]
    if out_ch % joints:
        raise CheckpointError(f"final_layer has {out_ch} outputs, not a multiple of joints={joints}")
    depth_dim = out_ch // joints
    try:
        flags = head_upsample or upsample_flags_for(depth_dim)
        spec = VariantSpec("custom", tuple(depths), tuple(dims), head_channels, flags, depth_dim, joints)
    except ValueError as exc:
        raise CheckpointError(f"unsupported architecture in checkpoint: {exc}") from None
    # The tensors read above fix the configuration; every other tensor must then fit it (a 3x3
    # final conv, say, is no ConvNeXtPose of any variant).
    expected = _expected_shapes(spec)
    wrong = [(k, e, _shape(state[k])) for k, e in expected.items() if k in state and _shape(state[k]) != e]
    if wrong:
        rows = "; ".join(f"{k}: expected {e}, found {f}" for k, e, f in wrong[:3])
        raise CheckpointError(
            f"not a ConvNeXtPose state_dict of any supported configuration: the configuration its tensors describe "
            f"(depths {spec.depths}, dims {spec.dims}, head {spec.head_tag}) contradicts {len(wrong)} tensor shape(s): "
            f"{rows}")
    name = match_variant(spec)
    return spec if name is None else dataclasses.replace(spec, name=name)


@functools.lru_cache(maxsize=32)
def _expected_shapes(spec: VariantSpec) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the network spec describes (built on torch's meta device: no memory, no init cost)."""
    import torch

    from .network import ConvNeXtPose  # lazy: imports torch

    with torch.device("meta"):
        model = ConvNeXtPose(spec)
    return {k: _shape(v) for k, v in model.state_dict().items()}


def detect_variant(state: Mapping[str, Any], joints: int = 18) -> str | VariantSpec:
    """The official variant name ("XS", "S", "M", "L") matching the weights, else the custom spec."""
    spec = detect_spec(state, joints)
    return spec.name if match_variant(spec) else spec


def read_state(checkpoint: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(state_dict without 'module.', the source named in messages) of a checkpoint file or a loaded dict."""
    if isinstance(checkpoint, (str, Path)):
        return load_checkpoint(checkpoint)[0], str(checkpoint)
    return unwrap_state_dict(checkpoint, "state_dict")[0], "state_dict"


# Key prefixes only one of the two networks has (after 'module.' is stripped).
_NETWORK_PREFIXES = {
    "ConvNeXtPose": ("backbone.downsample_layers.", "backbone.stages.", "head."),
    "RootNet": ("backbone.layer", "backbone.conv1.", "root."),
}


def network_of(state: Mapping[str, Any]) -> str | None:
    """Which network a state_dict's keys belong to: "ConvNeXtPose", "RootNet", or None (neither, or both)."""
    keys = list(_strip_module(state))
    found = [name for name, prefixes in _NETWORK_PREFIXES.items() if any(k.startswith(prefixes) for k in keys)]
    return found[0] if len(found) == 1 else None


def compare_state(expected: Mapping[str, Any], found: Mapping[str, Any]
                  ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing keys, unexpected keys, [(key, expected shape, found shape)])."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, _shape(v), _shape(found[k])) for k, v in expected.items()
                  if k in found and _shape(v) != _shape(found[k])]
    return missing, unexpected, mismatched


def list_items(items: list[Any], limit: int = 5) -> str:
    """The first `limit` items joined by commas, and how many more there are (error messages)."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def load_into(model: Any, checkpoint: str | Path | Mapping[str, Any]) -> None:
    """Load weights into a ConvNeXtPose module after checking they are of its architecture."""
    import torch

    state, source = read_state(checkpoint)
    if network_of(state) == "RootNet":
        raise CheckpointError(f"{source} holds RootNet weights (ResNet-50 backbone.layer*, root.*), not "
                              "ConvNeXtPose's: give it as the RootNet checkpoint, and a ConvNeXtPose snapshot here")
    expected = model.state_dict()
    missing, unexpected, mismatched = compare_state(expected, state)
    if mismatched:
        try:
            detected = detect_spec(state, model.spec.joints)
            what = detected.name if detected.name != "custom" else f"a custom spec {detected}"
        except CheckpointError as exc:
            what = f"no known configuration ({exc})"
        rows = "; ".join(f"{k}: expected {e}, found {f}" for k, e, f in mismatched[:3])
        raise CheckpointError(
            f"{source} holds weights of {what}, not of variant {model.spec.name}: {rows}"
            + (f" (+{len(mismatched) - 3} more mismatching tensors)" if len(mismatched) > 3 else "")
            + ". The variant is read from the tensor shapes; file names are often wrong.")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {list_items(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {list_items(unexpected)}")
        raise CheckpointError(f"{source} does not fit variant {model.spec.name}: " + "; ".join(parts))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def save_checkpoint(model: Any, path: str | Path) -> Path:
    """Save weights with their spec (loaded back by load_checkpoint / build_model)."""
    import torch

    path = Path(path)
    torch.save({FORMAT_KEY: FORMAT_VERSION, "spec": model.spec.to_dict(),
                "state_dict": model.state_dict()}, path)
    return path


def weights_sha256(state: Mapping[str, Any]) -> str:
    """Content hash of a state_dict: names, dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        arr = np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t)
        h.update(f"{key}|{arr.dtype}|{tuple(arr.shape)}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
