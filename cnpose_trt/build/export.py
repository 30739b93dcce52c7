"""PyTorch model -> ONNX graph: BatchNorm folded into convolutions, dynamic batch.

The FP32 graph written here is what every backend starts from (ONNX Runtime directly,
TensorRT after the precision passes). Two networks go through it with the same contract (input
'image' (N, 3, 256, 256), dynamic N): ConvNeXtPose (output 'heatmaps') and RootNet (output 'roots',
(N, 3) x, y, gamma; nn/rootnet.py says why k stays outside the graph).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..nn.network import Block, ConvNeXtPose, HeadLayer
from ..nn.rootnet import Bottleneck, RootNet
from ..spec import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a * x + c of an eval-mode BatchNorm, in float64."""
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    c = bn.bias.double() - bn.running_mean.double() * a
    return a, c


def _conv_then_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    a, c = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(a)
    dtype = conv.weight.dtype
    fused.weight = nn.Parameter((conv.weight.double() * a.view(-1, 1, 1, 1)).to(dtype))
    fused.bias = nn.Parameter((bias * a + c).to(dtype))
    return fused


def _deconv_then_bn(deconv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.ConvTranspose2d:
    # ConvTranspose2d stores (in, out, kh, kw): BatchNorm scales the output channels, dim 1.
    a, c = _bn_affine(bn)
    fused = copy.deepcopy(deconv)
    bias = deconv.bias.double() if deconv.bias is not None else torch.zeros_like(a)
    dtype = deconv.weight.dtype
    fused.weight = nn.Parameter((deconv.weight.double() * a.view(1, -1, 1, 1)).to(dtype))
    fused.bias = nn.Parameter((bias * a + c).to(dtype))
    return fused


def _bn_then_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    # Exact only without padding: a padded border would see 0, not the BN image of 0.
    if any(p != 0 for p in conv.padding) or conv.groups != 1:
        raise ValueError("BatchNorm can be folded into a following conv only without padding or groups")
    a, c = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    w = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    fused.weight = nn.Parameter((w * a.view(1, -1, 1, 1)).to(conv.weight.dtype))
    fused.bias = nn.Parameter((bias + (w * c.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))).to(conv.weight.dtype))
    return fused


def _bn_as_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A standalone BatchNorm as a depthwise 1x1 conv (TensorRT fuses it as a scale layer)."""
    a, c = _bn_affine(bn)
    dtype = bn.weight.dtype
    conv = nn.Conv2d(bn.num_features, bn.num_features, kernel_size=1, groups=bn.num_features, dtype=dtype)
    conv.weight = nn.Parameter(a.view(-1, 1, 1, 1).to(dtype))
    conv.bias = nn.Parameter(c.to(dtype))
    return conv


def fuse_batchnorm(model: ConvNeXtPose) -> ConvNeXtPose:
    """A copy of the model in deploy form: no BatchNorm left, same function.

    Conv->BN pairs (stem, blocks, head) fold into the conv; BN->Conv pairs of the unpadded
    2x2 downsampling convs fold into that conv; the backbone's final BN, followed by a padded
    depthwise conv, becomes a depthwise 1x1 conv.
    """
    fused = copy.deepcopy(model).eval()
    bb = fused.backbone
    stem = bb.downsample_layers[0]
    bb.downsample_layers[0] = nn.Sequential(_conv_then_bn(stem[0], stem[1]))
    for i in range(1, 4):
        down = bb.downsample_layers[i]
        bb.downsample_layers[i] = nn.Sequential(_bn_then_conv(down[0], down[1]))
    for module in fused.modules():
        if isinstance(module, (Block, HeadLayer)):
            module.dwconv = _conv_then_bn(module.dwconv, module.norm)
            module.norm = nn.Identity()
    bb.norm = _bn_as_conv(bb.norm)
    return fused


def fuse_rootnet_batchnorm(model: RootNet) -> RootNet:
    """A copy of RootNet in deploy form: every BatchNorm folded into the conv or deconv before it (the
    stem, the Bottlenecks' three convs and downsample, the head's three deconvolutions)."""
    fused = copy.deepcopy(model).eval()
    bb = fused.backbone
    bb.conv1, bb.bn1 = _conv_then_bn(bb.conv1, bb.bn1), nn.Identity()
    for block in fused.modules():
        if isinstance(block, Bottleneck):
            for i in (1, 2, 3):
                conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
                setattr(block, f"conv{i}", _conv_then_bn(conv, bn))
                setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(_conv_then_bn(block.downsample[0], block.downsample[1]))
    layers = list(fused.root.deconv_layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.ConvTranspose2d):
            layers[i], layers[i + 1] = _deconv_then_bn(layer, layers[i + 1]), nn.Identity()
    fused.root.deconv_layers = nn.Sequential(*layers)
    return fused


def _deploy_form(model: ConvNeXtPose | RootNet, fold_batchnorm: bool) -> tuple[nn.Module, str]:
    """(the module to trace, its output name): each network's fold and output, in one place."""
    if isinstance(model, RootNet):
        fold, output = fuse_rootnet_batchnorm, model.spec.output_name
    elif isinstance(model, ConvNeXtPose):
        fold, output = fuse_batchnorm, OUTPUT_NAME
    else:
        raise TypeError(f"model must be a ConvNeXtPose or RootNet module, got {type(model).__name__}")
    return (fold(model) if fold_batchnorm else copy.deepcopy(model).eval()), output


def export_onnx(model: ConvNeXtPose | RootNet, path: str | Path, opset: int = DEFAULT_OPSET,
                fold_batchnorm: bool = True) -> Path:
    """Write the model as ONNX: input 'image' (N, 3, S, S) float32, dynamic N; output 'heatmaps'
    (ConvNeXtPose) or 'roots' (RootNet: (N, 3) x, y, gamma).

    Raises:
        ValueError: opset below 17.
        TypeError: a module of neither network.
    """
    import onnx

    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be {DEFAULT_OPSET} or newer, got {opset}")
    path = Path(path)
    net, output_name = _deploy_form(model, fold_batchnorm)
    dummy = torch.zeros((2, *model.spec.input_shape), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo, which needs
        # onnxscript; for this plain conv net both give the same graph.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            net, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    left = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if fold_batchnorm and left:
        raise RuntimeError(f"BatchNorm nodes survived folding: {left[:3]}")
    log.info("exported %s (opset %d, %d nodes)", path, opset, len(proto.graph.node))
    return path
