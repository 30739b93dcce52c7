"""The ConvNeXtPose network in PyTorch, with the parameter names official checkpoints use.

Needs torch (the `export` extra); the runtime path never imports this module.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..spec import SpecLike, VariantSpec, get_spec

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "no checkpoint given: the network uses deterministic random weights, so its outputs are "
    "meaningless (fine for benchmarks and tests, not for poses)")


class Block(nn.Module):
    """ConvNeXt block with BatchNorm and ReLU: dwconv 7x7 -> BN -> 1x1 (4x) -> ReLU -> 1x1, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.pwconv2 = nn.Conv2d(4 * dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class Backbone(nn.Module):
    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...]) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), nn.BatchNorm2d(dims[0]))]
            + [nn.Sequential(nn.BatchNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
               for i in range(1, 4)])
        self.stages = nn.ModuleList(
            [nn.Sequential(*[Block(dims[i]) for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.BatchNorm2d(dims[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return self.norm(x)


class HeadLayer(nn.Module):
    """dwconv 3x3 -> BN -> 1x1 -> ReLU -> bilinear x2 (align_corners=True) or identity."""

    def __init__(self, in_ch: int, out_ch: int, upsample: bool) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(in_ch, in_ch, kernel_size=3, padding=1, groups=in_ch)
        self.norm = nn.BatchNorm2d(in_ch)
        self.pwconv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=2) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.act(self.pwconv(self.norm(self.dwconv(x)))))


class Head(nn.Module):
    def __init__(self, in_ch: int, channels: int, upsample: tuple[bool, ...], out_ch: int) -> None:
        super().__init__()
        self.deconv_layers_1 = HeadLayer(in_ch, channels, upsample[0])
        self.deconv_layers_2 = HeadLayer(channels, channels, upsample[1])
        self.deconv_layers_3 = HeadLayer(channels, channels, upsample[2])
        self.final_layer = nn.Conv2d(channels, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers_3(self.deconv_layers_2(self.deconv_layers_1(x))))


class ConvNeXtPose(nn.Module):
    """(N, 3, S, S) normalised RGB -> heatmaps (N, joints * depth_dim, H, W)."""

    def __init__(self, spec: VariantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = Backbone(spec.depths, spec.dims)
        self.head = Head(spec.dims[3], spec.head_channels, spec.head_upsample, spec.joints * spec.depth_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def init_random(model: nn.Module, seed: int = 0, bn_stats: bool = True) -> nn.Module:
    """Deterministic random weights; with bn_stats, non-trivial BatchNorm statistics too.

    Convolutions are scaled so that activations stay O(1) through the residual stages, which
    keeps heatmaps and their soft-argmax in a realistic (not saturated) range. The network input
    spans about -2.1 .. 1136 (upstream's normalisation of 0..255 pixels), so with bn_stats the
    stem's BatchNorm statistics are fitted to real normalised crops, as a trained network's are.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                gain = 0.5 if name.endswith("pwconv2") else 1.0
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * gain / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
                if bn_stats:
                    module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                    module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
        if bn_stats and isinstance(model, ConvNeXtPose):
            _fit_stem_statistics(model)
    return model


def _fit_stem_statistics(model: ConvNeXtPose) -> None:
    """Set the stem BatchNorm's running mean/var to its input's statistics on generated crops."""
    from ..io.draw import demo_image
    from ..io.preprocess import prepare

    image, box = demo_image()
    x, y, w, h = box
    boxes = [box, (x - w / 4, y + h / 4, w / 2, h / 2), (0, 0, image.shape[1], image.shape[0])]
    crops, _ = prepare(image, boxes, model.spec.input_size)
    conv, norm = model.backbone.downsample_layers[0]
    out = conv(torch.from_numpy(crops)).double()
    norm.running_mean.copy_(out.mean(dim=(0, 2, 3)))
    norm.running_var.copy_(out.var(dim=(0, 2, 3)) + norm.eps)


def build_model(variant_or_spec: SpecLike, checkpoint: str | Path | dict[str, Any] | None = None,
                *, seed: int = 0, warn_random: bool = True) -> ConvNeXtPose:
    """Build a ConvNeXtPose network in eval mode.

    Args:
        variant_or_spec: "XS", "S", "M", "L" or a VariantSpec.
        checkpoint: a checkpoint file (official snapshot, plain state_dict or one saved by
            this package) or an already-loaded state_dict. The architecture is read from the
            tensor shapes and must agree with ``variant_or_spec``.
        seed: seed of the deterministic random weights used without a checkpoint.

    Returns:
        The module; input (N, 3, 256, 256) float32, output (N, 18 * D, H, W).

    Raises:
        CheckpointError: unreadable file, or weights of another variant, or unknown/missing keys.
    """
    from .checkpoint import load_into

    spec = get_spec(variant_or_spec)
    model = ConvNeXtPose(spec)
    if checkpoint is None:
        if warn_random:
            warnings.warn(RANDOM_WEIGHTS_WARNING, UserWarning, stacklevel=2)
        init_random(model, seed)
    else:
        load_into(model, checkpoint)
    return model.eval()
