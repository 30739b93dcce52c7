"""The ConvNeXtPose network in PyTorch, with the parameter names official checkpoints use: the layers
only (model.py builds networks with weights, checkpoint.py reads their shapes from here).

Needs torch (the `export` extra); the runtime path never imports this module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import VariantSpec


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
