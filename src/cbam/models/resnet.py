"""ResNet, Wide-ResNet, ResNeXt and the CIFAR ResNets, with attention in every block.

Module names follow torchvision's ResNet (conv1, bn1, layer1..layer4, fc) so torchvision
weights map onto these models. SE and CBAM sit on the output of each block's last BN, before
the residual addition (REFERENCE.md section 2); BAM sits at the end of every stage but the last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbam._errors import check_positive_int, unknown_choice
from cbam.kernels import has_hooks
from cbam.layers.create_attention import AttentionSpec
from cbam.models._common import (
    AttentionBuilder,
    ClassifierMixin,
    attention_builders,
    check_image_batch,
    init_weights,
)
from cbam.models._registry import register_model

SHORTCUTS = ("projection", "zero_pad")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. (2016) for CIFAR: subsample, then zero-pad the new channels.
    It has no parameters, which is how resnet20 comes to 0.27M."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_ch - in_ch
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def _attention_tail(
    block: BasicBlock | Bottleneck,
    conv: nn.Module,
    x: torch.Tensor,
    bn: nn.Module,
    identity: torch.Tensor,
) -> torch.Tensor:
    """relu(attention(bn(conv(x))) + identity): the block's last conv and BN, its attention
    and the residual add. A CBAM computes all but the conv in one fused function (BatchNorm's
    output is recomputed in the backward rather than kept, and the gates fold into the add)
    unless it runs its reference implementation or something hooks these modules."""
    pre_bn = conv(x)
    fused = getattr(block.attention, "fused_residual", None)
    if fused is not None:  # the conv's output is the tail's scratch unless a hook saw it
        out = fused(pre_bn, bn, identity, block.relu, pre_bn_scratch=not has_hooks(conv))
        if out is not None:
            return out
    return block.relu(block.attention(bn(pre_bn)) + identity)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        attention: AttentionBuilder | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock has no grouped convs: use groups=1, width_per_group=64")
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attention = attention(planes) if attention else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return _attention_tail(self, self.conv2, out, self.bn2, identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups) -> 1x1 x4, stride on the 3x3 as in torchvision and the
    authors' code (ResNet v1.5)."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        attention: AttentionBuilder | None = None,
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.attention = attention(out_ch) if attention else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return _attention_tail(self, self.conv3, out, self.bn3, identity)


class ResNet(ClassifierMixin, nn.Module):
    """A residual network of `len(layers)` stages.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage.
        widths: planes per stage (a Bottleneck stage outputs 4x this).
        stem_width: channels of the first conv.
        small_input: 3x3 stride-1 first conv and no max-pool, for 28-64 px images.
        shortcut: "projection" (1x1 conv + BN where shapes change) or "zero_pad" (CIFAR
            option A: parameter-free).
        attention, attention_kwargs: see `cbam.create_model`.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        small_input: bool = False,
        shortcut: str = "projection",
        attention: AttentionSpec = None,
        attention_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_chans", in_chans)
        if shortcut not in SHORTCUTS:
            raise unknown_choice("shortcut", shortcut, SHORTCUTS)
        self.in_chans = in_chans
        block_attention, stage_attention = attention_builders(attention, attention_kwargs)

        if small_input:
            self.conv1 = conv3x3(in_chans, stem_width)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        self.stage_names: list[str] = []
        self.feature_info: list[dict[str, Any]] = []
        in_ch, reduction = stem_width, 1 if small_input else 4
        for i, (planes, depth) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            out_ch = planes * block.expansion
            downsample: nn.Module | None = None
            if stride != 1 or in_ch != out_ch:
                if shortcut == "projection":
                    downsample = nn.Sequential(
                        conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch)
                    )
                else:
                    downsample = ZeroPadShortcut(in_ch, out_ch, stride)
            blocks: list[nn.Module] = [
                block(in_ch, planes, stride, downsample, groups, width_per_group, block_attention)
            ]
            blocks += [
                block(out_ch, planes, 1, None, groups, width_per_group, block_attention)
                for _ in range(1, depth)
            ]
            if stage_attention is not None and i < len(layers) - 1:
                blocks.append(stage_attention(out_ch))
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.feature_info.append({"num_chs": out_ch, "reduction": reduction, "module": name})
            in_ch = out_ch

        self.num_features = in_ch
        self.reset_classifier(num_classes)
        init_weights(self)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, in `feature_info` order: what a detection neck (an FPN)
        takes from the backbone."""
        check_image_batch(x, self.in_chans, type(self).__name__)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            stages.append(x)
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


@register_model(ResNet)
def resnet18(**kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model(ResNet)
def resnet34(**kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model(ResNet)
def resnet50(**kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model(ResNet)
def resnet101(**kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model(ResNet)
def resnet152(**kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


@register_model(ResNet)
def wide_resnet18(widen: float = 1.5, **kwargs: Any) -> ResNet:
    """ResNet-18 with every stage `widen` times wider; the 64-channel stem stays as it is,
    which is what reproduces the paper's 25.88M (widen 1.5)."""
    if isinstance(widen, bool) or not isinstance(widen, int | float) or widen <= 0:
        raise ValueError(
            f"widen must be a positive number (the paper uses 1.5 or 2.0), got {widen!r}"
        )
    widths = [round(64 * widen) * 2**i for i in range(4)]
    return ResNet(BasicBlock, [2, 2, 2, 2], widths=widths, **kwargs)


@register_model(ResNet)
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


@register_model(ResNet)
def resnext101_32x4d(**kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, **kwargs)


def _cifar_resnet(depth: int, **kwargs: Any) -> ResNet:
    """The 6n+2-layer CIFAR ResNets of He et al. (2016), section 4.2: 16-32-64 channels."""
    n = (depth - 2) // 6
    kwargs.setdefault("small_input", True)
    kwargs.setdefault("shortcut", "zero_pad")
    return ResNet(BasicBlock, [n, n, n], widths=(16, 32, 64), stem_width=16, **kwargs)


@register_model(ResNet, input_size=32, num_classes=10)
def resnet20(**kwargs: Any) -> ResNet:
    return _cifar_resnet(20, **kwargs)


@register_model(ResNet, input_size=32, num_classes=10)
def resnet32(**kwargs: Any) -> ResNet:
    return _cifar_resnet(32, **kwargs)


@register_model(ResNet, input_size=32, num_classes=10)
def resnet44(**kwargs: Any) -> ResNet:
    return _cifar_resnet(44, **kwargs)


@register_model(ResNet, input_size=32, num_classes=10)
def resnet56(**kwargs: Any) -> ResNet:
    return _cifar_resnet(56, **kwargs)


@register_model(ResNet, input_size=32, num_classes=10)
def resnet110(**kwargs: Any) -> ResNet:
    return _cifar_resnet(110, **kwargs)
