"""RootNet in PyTorch, with the parameter names of the official checkpoints (backbone.*, root.*):
the layers, the checkpoint load and the random weights of a network without one.

The facts (sizes, bbox_real, the parameter count) are spec.ROOTNET's; the host math around the network
(k, cells -> image px -> camera mm) is ops/rootnet.py's. Needs torch; the runtime never imports this.

The exported module differs from upstream's ResPoseNet.forward(img, k_value) in one way: it takes the
normalised crops only and returns (N, 3) = x, y, gamma; the caller computes depth = gamma * k on the
host in float64 (ops.rootnet.root_depths). Why k stays outside the engine:
- k = sqrt(bbox_real_x * bbox_real_y * fx * fy / (w * h)) depends on the box and the camera, not on the
  pixels: the network's only use of it is one multiplication after everything else.
- One input keeps the engine contract of ConvNeXtPose (one 'image' tensor, dynamic batch): the same
  crop path, staging buffers, INT8 calibration crops and verification serve both networks.
- In an FP16 or INT8 engine k (about 6,000 to 25,000 for typical boxes, i.e. beyond float16's 2048 of
  exact integers) would be rounded to float16 or multiplied in reduced precision; on the host it is
  exact to float64, and gamma is the only value the engine rounds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from ..spec import ROOTNET, RootNetSpec
from .checkpoint import compare_state, list_items, network_of, read_state

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "no RootNet checkpoint given: the network uses deterministic random weights, so its root positions "
    "and depths are meaningless (fine for benchmarks and tests, not for people)")


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (v1.5: the stride sits in the 3x3 conv2), with its layer names:
    1x1 -> 3x3 (stride) -> 1x1 (4x), BatchNorm after each, ReLU, residual (downsampled when the shape
    changes)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetBackbone(nn.Module):
    """torchvision's ResNet without avgpool and fc: (N, 3, S, S) -> (N, 2048, S/32, S/32)."""

    def __init__(self, spec: RootNetSpec = ROOTNET) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip(spec.planes, spec.blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class RootHead(nn.Module):
    """The backbone's (N, 2048, 8, 8) -> (N, 3) = x, y (soft-argmax in cells 0..63), gamma.

    x, y: three [ConvTranspose2d k4 s2 p1, BN, ReLU] groups to 256x64x64, a 1x1 xy_layer, a softmax
    over all 64x64 positions, and the expectation of the column / row index (no half-cell offset).
    gamma: a 1x1 depth_layer on the global average of the backbone output (it never sees the deconvs).
    """

    def __init__(self, spec: RootNetSpec = ROOTNET) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = spec.backbone_channels
        for _ in range(spec.num_deconv):
            layers += [nn.ConvTranspose2d(channels, spec.head_channels, kernel_size=4, stride=2, padding=1,
                                          output_padding=0, bias=False),
                       nn.BatchNorm2d(spec.head_channels), nn.ReLU(inplace=True)]
            channels = spec.head_channels
        self.deconv_layers = nn.Sequential(*layers)
        self.xy_layer = nn.Conv2d(spec.head_channels, 1, kernel_size=1)
        self.depth_layer = nn.Conv2d(spec.backbone_channels, 1, kernel_size=1)

    def forward(self, fm: torch.Tensor) -> torch.Tensor:
        logits = self.xy_layer(self.deconv_layers(fm))
        h, w = logits.shape[-2:]
        # softmax over the whole map, then the marginals: upstream's summation order, so float32 sums agree
        prob = F.softmax(logits.flatten(1), dim=1).reshape(-1, h, w)
        cells_x = torch.arange(w, dtype=prob.dtype, device=prob.device)
        cells_y = torch.arange(h, dtype=prob.dtype, device=prob.device)
        x = (prob.sum(dim=1) * cells_x).sum(dim=1, keepdim=True)
        y = (prob.sum(dim=2) * cells_y).sum(dim=1, keepdim=True)
        pooled = fm.flatten(2).mean(dim=2)[:, :, None, None]
        gamma = self.depth_layer(pooled).flatten(1)
        return torch.cat((x, y, gamma), dim=1)


class RootNet(nn.Module):
    """(N, 3, 256, 256) normalised RGB crops -> (N, 3) = x, y (output cells), gamma; depth = gamma * k
    outside (the module docstring says why). State dict keys: backbone.*, root.* (official, less 'module.')."""

    def __init__(self, spec: RootNetSpec = ROOTNET) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = ResNetBackbone(spec)
        self.root = RootHead(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.root(self.backbone(x))


def load_rootnet_into(model: RootNet, checkpoint: str | Path | Mapping[str, Any]) -> None:
    """Load an official RootNet snapshot ({'epoch', 'network': 'module.backbone.*' / 'module.root.*',
    'optimizer'}) or a plain state_dict, strictly.

    Raises:
        CheckpointError: in one line: unreadable file, ConvNeXtPose weights, missing or unexpected keys,
            tensors of other shapes, non-float or non-finite weights.
    """
    state, source = read_state(checkpoint)
    found = network_of(state)
    if found is not None and found != "RootNet":
        raise CheckpointError(f"{source} holds {found} weights, not RootNet's (ResNet-50 backbone.layer*, root.*): "
                              "give it as the pose network's checkpoint, and a RootNet snapshot here")
    missing, unexpected, mismatched = compare_state(model.state_dict(), state)
    parts = []
    if mismatched:
        rows = [f"{k} expected {e}, found {f}" for k, e, f in mismatched]
        parts.append(f"tensors of other shapes: {list_items(rows, 3)}")
    if missing:
        parts.append(f"missing keys: {list_items(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {list_items(unexpected)}")
    if parts:
        raise CheckpointError(f"{source} does not fit RootNet (ResNet-50, {model.spec.parameters:,} parameters): "
                              + "; ".join(parts))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def init_random_rootnet(model: RootNet, seed: int = 0) -> RootNet:
    """Deterministic random weights that keep activations O(1): He-scaled convolutions, BatchNorm affine
    1 + 0.1 N and 0.1 N, and running statistics fitted by one train-mode pass over generated crops (as the
    golden network's were), so the output is neither saturated nor constant; gamma is positive, of order one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                w = module.weight
                # ConvTranspose2d stores (in, out, kh, kw); each output sees in * kh * kw / stride^2 taps
                fan_in = w[0].numel() if isinstance(module, nn.Conv2d) else w.shape[0] * w[0, 0].numel() // 4
                gain = {"root.xy_layer": 2.0, "root.depth_layer": 0.1}.get(name, 1.0)
                w.copy_(torch.randn(w.shape, generator=gen) * gain * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    base = 0.5 if name == "root.depth_layer" else 0.0
                    module.bias.copy_(base + 0.05 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.num_features, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=gen))
        _fit_batchnorm(model)
    return model


def _fit_batchnorm(model: RootNet) -> None:
    """Running statistics = batch statistics of one pass (momentum None: a cumulative average)."""
    from ..io.draw import demo_image
    from ..io.preprocess import prepare

    image, box = demo_image()
    x, y, w, h = box
    crops, _ = prepare(image, [box, (x - w / 4, y + h / 4, w / 2, h / 2)], model.spec.input_size)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(torch.from_numpy(crops))
    for m in norms:
        m.momentum = 0.1  # torch's default, as a freshly built module has
    model.eval()


def build_rootnet(checkpoint: str | Path | Mapping[str, Any] | None = None, *, seed: int = 0,
                  warn_random: bool = True) -> RootNet:
    """RootNet in eval mode, with a checkpoint's weights (load_rootnet_into) or deterministic random ones.

    Returns:
        The module; input (N, 3, 256, 256) float32 normalised crops, output (N, 3) x, y cells, gamma.
    Raises:
        CheckpointError: see load_rootnet_into.
    """
    model = RootNet()
    if checkpoint is None:
        if warn_random:
            warnings.warn(RANDOM_WEIGHTS_WARNING, UserWarning, stacklevel=2)
        init_random_rootnet(model, seed)
    else:
        load_rootnet_into(model, checkpoint)
    return model.eval()
