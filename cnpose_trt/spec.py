"""The facts every other module asks for: variant table, joints, input contract.

Nothing here imports torch, onnx or any GPU library, so the runtime can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import checks

NUM_HEAD_LAYERS = 3
BACKBONE_STRIDE = 32
INPUT_SIZE = 256

# The network input, exactly as upstream feeds it: (pixel - PIXEL_MEAN) / PIXEL_STD per RGB channel on
# pixel values in 0..255, NOT scaled to [0, 1] first. Upstream's crop is float32 0..255 and torchvision's
# ToTensor divides by 255 only for uint8 input, so its Normalize applies ImageNet's [0, 1] statistics to
# 0..255 values; the official weights were trained on that (inputs span about -2.1 .. 1136).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
# The exported graph's contract (export.py writes it, every backend reads it): names and the oldest opset.
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "heatmaps"
# Names this convention in engine metadata and cache keys: engines and INT8 ranges made under another
# convention are never reused.
INPUT_CONVENTION = "rgb-0..255-minus-mean-over-std"

# Depth of the 3D box the heatmap's z axis spans (bbox_3d_shape), in mm.
BBOX_3D_DEPTH_MM = 2000.0
# The crop is the squared box grown by this factor around its centre (upstream process_bbox).
BOX_SCALE = 1.25

JOINT_NAMES: tuple[str, ...] = (
    "Pelvis", "R_Hip", "R_Knee", "R_Ankle", "L_Hip", "L_Knee", "L_Ankle", "Torso",
    "Neck", "Nose", "Head", "L_Shoulder", "L_Elbow", "L_Wrist", "R_Shoulder",
    "R_Elbow", "R_Wrist", "Thorax",
)
NUM_JOINTS = len(JOINT_NAMES)
ROOT_JOINT = 0
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 4), (2, 5), (3, 6), (14, 11), (15, 12), (16, 13))
SKELETON: tuple[tuple[int, int], ...] = (
    (0, 7), (7, 8), (8, 9), (9, 10), (8, 11), (11, 12), (12, 13), (8, 14), (14, 15),
    (15, 16), (0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6),
)


def _positive_int_tuple(name: str, value: Any, length: int) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {length} positive integers, got {value!r}") from None
    if len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}: {items!r}")
    out = []
    for item in items:
        if not checks.is_integer(item) or item <= 0:
            raise ValueError(f"{name} must hold positive integers, got {items!r}")
        out.append(int(item))
    return tuple(out)


def _positive_int(name: str, value: Any) -> int:
    return checks.integer(name, value, 1)


@dataclass(frozen=True)
class VariantSpec:
    """One ConvNeXtPose configuration: backbone, head and output volume.

    The heatmap tensor the network emits is (N, joints * depth_dim, H, W) with
    H = W = input_size / 32 * 2 ** (number of upsampling head layers).
    """

    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    head_channels: int
    head_upsample: tuple[bool, bool, bool]
    depth_dim: int
    joints: int = NUM_JOINTS
    input_size: int = INPUT_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "depths", _positive_int_tuple("depths", self.depths, 4))
        object.__setattr__(self, "dims", _positive_int_tuple("dims", self.dims, 4))
        object.__setattr__(self, "head_channels", _positive_int("head_channels", self.head_channels))
        try:
            flags = tuple(self.head_upsample)
        except TypeError:
            raise ValueError(f"head_upsample must be a sequence of {NUM_HEAD_LAYERS} booleans, "
                             f"got {self.head_upsample!r}") from None
        if len(flags) != NUM_HEAD_LAYERS:
            raise ValueError(
                f"head_upsample must have {NUM_HEAD_LAYERS} entries (ConvNeXtPose heads always have "
                f"three layers; a non-upsampling layer is False), got {len(flags)}: {flags!r}")
        if not all(isinstance(f, bool) for f in flags):
            raise ValueError(f"head_upsample must hold booleans, got {flags!r}")
        object.__setattr__(self, "head_upsample", flags)
        object.__setattr__(self, "depth_dim", _positive_int("depth_dim", self.depth_dim))
        object.__setattr__(self, "joints", _positive_int("joints", self.joints))
        size = _positive_int("input_size", self.input_size)
        if size % BACKBONE_STRIDE:
            raise ValueError(f"input_size must be a multiple of {BACKBONE_STRIDE}, got {size}")
        object.__setattr__(self, "input_size", size)

    @property
    def num_upsample(self) -> int:
        return sum(self.head_upsample)

    @property
    def heatmap_size(self) -> int:
        """H (= W) of the heatmap volume."""
        return self.input_size // BACKBONE_STRIDE * 2 ** self.num_upsample

    @property
    def heatmap_shape(self) -> tuple[int, int, int]:
        """(joints * depth_dim, H, W), one image's heatmap tensor."""
        return (self.joints * self.depth_dim, self.heatmap_size, self.heatmap_size)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """One image's engine output (the heatmaps): what every network spec names output_shape."""
        return self.heatmap_shape

    @property
    def head_tag(self) -> str:
        """Names the head configuration, e.g. '3UP-256ch-D64' (benchmark groups, file names)."""
        return f"{self.num_upsample}UP-{self.head_channels}ch-D{self.depth_dim}"

    def same_architecture(self, other: VariantSpec) -> bool:
        """True when both specs build identical networks (names aside)."""
        return dataclasses.replace(self, name="_") == dataclasses.replace(other, name="_")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["depths"], d["dims"], d["head_upsample"] = list(self.depths), list(self.dims), list(self.head_upsample)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown variant spec fields {unknown}; allowed: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


VARIANTS: Mapping[str, VariantSpec] = {
    "XS": VariantSpec("XS", (2, 2, 6, 2), (40, 80, 160, 320), 128, (True, True, False), 32),
    "S": VariantSpec("S", (3, 3, 9, 3), (48, 96, 192, 384), 256, (True, True, False), 32),
    "M": VariantSpec("M", (3, 3, 9, 3), (48, 96, 192, 384), 256, (True, True, True), 64),
    "L": VariantSpec("L", (3, 3, 9, 3), (48, 96, 192, 384), 512, (True, True, True), 64),
}

SpecLike = str | VariantSpec


def get_spec(variant: SpecLike) -> VariantSpec:
    """Resolve a variant name (case-insensitive) or pass a VariantSpec through.

    Raises:
        ValueError: unknown variant name.
        TypeError: neither a string nor a VariantSpec.
    """
    if isinstance(variant, VariantSpec):
        return variant
    if isinstance(variant, str):
        spec = VARIANTS.get(variant.strip().upper())
        if spec is None:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)} (or a VariantSpec), got {variant!r}")
        return spec
    raise TypeError(f"variant must be a variant name or a VariantSpec, got {type(variant).__name__}")


def match_variant(spec: VariantSpec) -> str | None:
    """The official variant name whose architecture equals spec, else None."""
    for name, official in VARIANTS.items():
        if official.same_architecture(spec):
            return name
    return None


def conv_weight_shapes(spec: VariantSpec) -> dict[tuple[int, int, int, int], int]:
    """How many convolution weights of each shape (out, in / groups, kh, kw) the network of spec has in
    deploy form (BatchNorm folded, export.fuse_batchnorm): what every ONNX engine of it holds, whatever
    its precision; the variant of an engine file is checked with it (model.py builds these layers)."""
    counts: dict[tuple[int, int, int, int], int] = {}

    def add(shape: tuple[int, int, int, int], n: int = 1) -> None:
        counts[shape] = counts.get(shape, 0) + n

    d = spec.dims
    add((d[0], 3, 4, 4))  # stem
    for i in range(1, 4):
        add((d[i], d[i - 1], 2, 2))  # downsampling
    for i in range(4):  # blocks: dwconv 7x7, pwconv1 (4x), pwconv2
        add((d[i], 1, 7, 7), spec.depths[i])
        add((4 * d[i], d[i], 1, 1), spec.depths[i])
        add((d[i], 4 * d[i], 1, 1), spec.depths[i])
    add((d[3], 1, 1, 1))  # the backbone's last BatchNorm, as a depthwise 1x1 conv
    channels = d[3]
    for _ in range(NUM_HEAD_LAYERS):  # head layers: dwconv 3x3, pwconv
        add((channels, 1, 3, 3))
        add((spec.head_channels, channels, 1, 1))
        channels = spec.head_channels
    add((spec.joints * spec.depth_dim, spec.head_channels, 1, 1))  # final layer
    return counts


def rootnet_weight_shapes(spec: RootNetSpec) -> dict[tuple[int, int, int, int], int]:
    """RootNet's 4-D weights by shape in deploy form (BatchNorm folded, export.fuse_rootnet_batchnorm): the
    convolutions (out, in, kh, kw) and the head's transposed convolutions (in, out, 4, 4), as every ONNX
    engine of it holds them, whatever its precision (nn/rootnet.py builds these layers)."""
    counts: dict[tuple[int, int, int, int], int] = {}

    def add(shape: tuple[int, int, int, int]) -> None:
        counts[shape] = counts.get(shape, 0) + 1

    add((64, 3, 7, 7))  # stem
    inplanes = 64
    for planes, blocks in zip(spec.planes, spec.blocks, strict=True):
        out = 4 * planes
        for b in range(blocks):
            add((planes, inplanes, 1, 1))
            add((planes, planes, 3, 3))
            add((out, planes, 1, 1))
            if b == 0:
                add((out, inplanes, 1, 1))  # downsample
            inplanes = out
    channels = spec.backbone_channels
    for _ in range(spec.num_deconv):
        add((channels, spec.head_channels, 4, 4))
        channels = spec.head_channels
    add((1, spec.head_channels, 1, 1))  # xy_layer
    add((1, spec.backbone_channels, 1, 1))  # depth_layer
    return counts


def network_weight_shapes(spec: VariantSpec | RootNetSpec) -> dict[tuple[int, int, int, int], int]:
    """The 4-D weights by shape of either network's deploy form (conv_weight_shapes, rootnet_weight_shapes)."""
    return rootnet_weight_shapes(spec) if isinstance(spec, RootNetSpec) else conv_weight_shapes(spec)


def upsample_flags_for(depth_dim: int, input_size: int = INPUT_SIZE, heatmap_size: int | None = None
                       ) -> tuple[bool, bool, bool]:
    """Head upsample flags implied by a cubic heatmap volume (H = W = depth_dim).

    The weights do not reveal which head layers upsample; ConvNeXtPose volumes are cubic, so
    H = depth_dim fixes how many do (the first ones, as in the official heads).
    """
    side = depth_dim if heatmap_size is None else heatmap_size
    base = input_size // BACKBONE_STRIDE
    for k in range(NUM_HEAD_LAYERS + 1):
        if base * 2 ** k == side:
            return tuple(i < k for i in range(NUM_HEAD_LAYERS))  # type: ignore[return-value]
    raise ValueError(
        f"cannot infer the head's upsampling layers: a {side}x{side} heatmap is not "
        f"{base}x{base} times 1, 2, 4 or 8; pass head_upsample explicitly")


def custom_spec(base: SpecLike, name: str = "custom", **changes: Sequence[Any] | int | str) -> VariantSpec:
    """A spec derived from another, e.g. custom_spec('S', head_upsample=(True,)*3, depth_dim=64)."""
    return dataclasses.replace(get_spec(base), name=name, **changes)


@dataclass(frozen=True)
class RootNetSpec:
    """RootNet (Moon et al., ICCV 2019; mks0601/3DMPPE_ROOTNET_RELEASE main/config.py, main/model.py):
    the one place that knows its facts. The network (nn/rootnet.py) is built from it, and the host math
    (ops/rootnet.py: k, the cell -> image mapping) reads it. It lives here, not in nn/, because the
    ops room needs bbox_real and the output grid and must not import torch.

    The exported network maps (N, 3, S, S) normalised crops (the ConvNeXtPose input contract) to
    (N, 3) = x, y in output cells 0..output_size-1 and gamma; depth mm = gamma * k, with
    k = sqrt(bbox_real_x * bbox_real_y * fx * fy / (w * h)) of the processed box, on the host.
    """

    name: str = "rootnet"
    input_size: int = INPUT_SIZE
    output_size: int = 64  # the xy map: input / 4 (three x2 deconvolutions of the stride-32 backbone)
    # bbox_real in mm (Human3.6M, MuCo, MuPoTS training; 3DPW's weights use (2, 2)).
    bbox_real_mm: tuple[float, float] = (2000.0, 2000.0)
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # ResNet-50 Bottleneck blocks per stage
    planes: tuple[int, int, int, int] = (64, 128, 256, 512)  # Bottleneck widths; outputs are 4x
    head_channels: int = 256
    num_deconv: int = 3
    # Learnable parameters of the released network (backbone 23,508,032 + head 10,489,602).
    parameters: int = 33_997_634
    output_name: str = "roots"  # the exported graph's output (x, y, gamma); its input is INPUT_NAME

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    @property
    def output_shape(self) -> tuple[int]:
        """One image's output: x, y (cells), gamma."""
        return (3,)

    @property
    def backbone_channels(self) -> int:
        return self.planes[-1] * 4

    @property
    def head_tag(self) -> str:
        """Names the configuration like VariantSpec.head_tag (file names, inspect): 'R50-XY64'."""
        return f"R{3 * sum(self.blocks) + 2}-XY{self.output_size}"

    def same_architecture(self, other: Any) -> bool:
        return isinstance(other, RootNetSpec) and self == other

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RootNetSpec:
        """The spec an engine's sidecar records; only this version's RootNet is accepted (its network is
        fixed: a sidecar recording other facts was edited or is foreign).

        Raises:
            ValueError: unknown fields, or facts other than ROOTNET's.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields) if isinstance(data, Mapping) else ["(not an object)"]
        if unknown:
            raise ValueError(f"unknown RootNet spec fields {unknown}; allowed: {sorted(fields)}")
        spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        if spec != ROOTNET:
            differ = sorted(k for k in fields if getattr(spec, k) != getattr(ROOTNET, k))
            raise ValueError(f"RootNet spec fields {differ} differ from this version's RootNet")
        return spec


ROOTNET = RootNetSpec()
# The networks an engine can hold (config.BuildConfig.model, an engine's sidecar "model").
MODELS = ("convnextpose", "rootnet")


def model_of(spec: VariantSpec | RootNetSpec) -> str:
    """The network a spec describes: "rootnet" or "convnextpose"."""
    return "rootnet" if isinstance(spec, RootNetSpec) else "convnextpose"


def spec_from_dict(model: str, data: Mapping[str, Any]) -> VariantSpec | RootNetSpec:
    """The spec a sidecar records for its model ("convnextpose": VariantSpec, "rootnet": RootNetSpec).

    Raises:
        ValueError: an unknown model or a malformed spec.
    """
    if model == "rootnet":
        return RootNetSpec.from_dict(data)
    if model == "convnextpose":
        return VariantSpec.from_dict(data)
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
