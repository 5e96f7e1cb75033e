"""Our ResNets (with or without CBAM / SE) as Faster R-CNN backbones: every stage's output
through torchvision's FeaturePyramidNetwork.

The backbone is the registry's model as it is, so ImageNet-style weights load through
`cbam.load_checkpoint` (ours, torchvision's, or the CBAM authors'), all or nothing, before the
classifier is dropped. As in torchvision's detection backbones, pretrained trunks get frozen
BatchNorm and only their last stages train (`trainable_layers`). Attention layers always
train and keep ordinary BatchNorm: torchvision's weights hold none of them, CBAM's spatial
gate BN (weight 0 at init) frozen would pin every gate at 0.5, and it normalises one channel
over all pixels of the batch, so small detection batches do not starve it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from cbam.interop import load_checkpoint, read_checkpoint
from cbam.interop.checkpoints import is_attention_layer
from cbam.interop.safe_load import CheckpointSource
from cbam.layers.create_attention import AttentionSpec
from cbam.models import ResNet, create_model, list_models, model_entry


class ResNetFPN(nn.Module):
    """A cbam ResNet's stage outputs (C2..C5) through an FPN, plus a max-pooled extra level:
    what torchvision's FasterRCNN expects of a backbone (`out_channels`, a dict of maps)."""

    def __init__(
        self,
        body: ResNet,
        out_channels: int = 256,
        trainable_layers: int = 0,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [info["num_chs"] for info in body.feature_info], out_channels,
            extra_blocks=LastLevelMaxPool(),
        )  # fmt: skip
        self.out_channels = out_channels
        self.trainable_layers = trainable_layers  # as resolved by build_backbone
        self.frozen_bn = frozen_bn

    @property
    def feature_names(self) -> list[str]:
        """Names of the FPN maps the RoI pooling reads (the extra pooled level excluded)."""
        return [str(i) for i in range(len(self.body.stage_names))]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.body.forward_stages(x)
        return self.fpn(OrderedDict(zip(self.feature_names, stages, strict=True)))


def resnet_backbones() -> list[str]:
    """Registered models that can serve as detection backbones (the ResNet family)."""
    return [name for name in list_models() if model_entry(name).model_class is ResNet]


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d outside attention layers by a FrozenBatchNorm2d with the same
    statistics and affine values; returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if is_attention_layer(child):
            continue
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)  # type: ignore[arg-type]
                frozen.running_var.copy_(child.running_var)  # type: ignore[arg-type]
            setattr(module, name, frozen.to(child.weight.device))
            replaced += 1
        else:
            replaced += freeze_batchnorm(child)
    return replaced


def set_trainable_layers(body: ResNet, trainable_layers: int) -> None:
    """torchvision's rule: train the last `trainable_layers` of (stem, stage 1, ..., stage N),
    freeze the rest. Attention layers always train."""
    order = [*reversed(body.stage_names), "conv1"]
    if not 0 <= trainable_layers <= len(order):
        raise ValueError(
            f"trainable_layers must be between 0 and {len(order)} for this backbone "
            f"({len(order)} = everything, stem included), got {trainable_layers}"
        )
    trained = order[:trainable_layers] + (["bn1"] if trainable_layers == len(order) else [])
    attention = [f"{n}." for n, m in body.named_modules() if n and is_attention_layer(m)]
    for name, parameter in body.named_parameters():
        train = any(name.startswith(prefix) for prefix in (*trained, *attention))
        parameter.requires_grad_(train)


def build_backbone(
    name: str = "resnet50",
    attention: AttentionSpec = "cbam",
    *,
    attention_kwargs: Mapping[str, Any] | None = None,
    weights: CheckpointSource | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    out_channels: int = 256,
) -> ResNetFPN:
    """A registered ResNet (`resnet18` ... `resnet101`, ResNeXt, Wide-ResNet) + FPN.

    weights: an ImageNet-style checkpoint of that ResNet (a `cbam train` .safetensors,
        torchvision's state dict, or the CBAM authors' .pth.tar), loaded all or nothing;
        its classifier, whatever its size, is dropped.
    trainable_layers: how many of (last stage, ..., first stage, stem) train; default 3 with
        weights (torchvision's default), everything without.
    frozen_bn: FrozenBatchNorm2d in the trunk; default on with weights, off without (a trunk
        trained from scratch needs its BatchNorm).
    """
    if name not in resnet_backbones():
        raise ValueError(
            f"detection backbones are ResNet-family models ({', '.join(resnet_backbones())}); "
            f"got {name!r}"
        )
    num_classes = 0
    if weights is not None:
        head = read_checkpoint(weights).state_dict.get("fc.weight")
        num_classes = 0 if head is None else int(head.shape[0])
    body = create_model(
        name, attention=attention, num_classes=num_classes, attention_kwargs=attention_kwargs
    )
    assert isinstance(body, ResNet)
    if weights is not None:
        load_checkpoint(body, weights)
        body.reset_classifier(0)  # detection has no use for the classifier
    pretrained = weights is not None
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else len(body.stage_names) + 1
    set_trainable_layers(body, trainable_layers)
    frozen = pretrained if frozen_bn is None else frozen_bn
    if frozen:
        freeze_batchnorm(body)
    return ResNetFPN(body, out_channels, trainable_layers, frozen)
