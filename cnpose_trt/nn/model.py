"""ConvNeXtPose networks ready to run: build_model (random weights or a checkpoint), init_random,
count_parameters. The layers themselves are in network.py (which checkpoint.py also uses).

Needs torch (the `export` extra); the runtime path never imports this module.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.draw import demo_image
from ..io.preprocess import prepare
from ..spec import SpecLike, get_spec
from .checkpoint import load_into
from .network import ConvNeXtPose

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "no checkpoint given: the network uses deterministic random weights, so its outputs are "
    "meaningless (fine for benchmarks and tests, not for poses)")


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
    spec = get_spec(variant_or_spec)
    model = ConvNeXtPose(spec)
    if checkpoint is None:
        if warn_random:
            warnings.warn(RANDOM_WEIGHTS_WARNING, UserWarning, stacklevel=2)
        init_random(model, seed)
    else:
        load_into(model, checkpoint)
    return model.eval()
