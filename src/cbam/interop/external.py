"""torchvision and timm classifiers by name (`torchvision:mobilenet_v3_small`, `timm:resnet18`),
with weights from a local file (no hub is reached), a new head, and optional attention.

Order matters: the network is built as the weights file expects (its own head size), the
weights are loaded strictly, then the head is replaced for `num_classes`, the first conv is
adapted to `in_chans`, and only then is attention attached (with identity init, so the
loaded network's function is kept).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from cbam._errors import unknown_choice
from cbam.interop.errors import CheckpointError

SOURCES = ("torchvision", "timm")


def is_external(name: str) -> bool:
    return name.partition(":")[0] in SOURCES and ":" in name


def create_external(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    attach: str | None = None,
    placement: str = "auto",
    identity_init: bool = True,
    attention_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """`torchvision:NAME` or `timm:NAME`, optionally loaded from `pretrained` (a .safetensors
    or .pth file of the network as published, any head size) and with `attach` attention.
    `bn_momentum` (in model_kwargs) overrides every BN layer's momentum."""
    source, _, arch = name.partition(":")
    bn_momentum = model_kwargs.pop("bn_momentum", None)
    model = _build(source, arch, None if pretrained else num_classes, model_kwargs)
    if bn_momentum is not None:
        set_bn_momentum(model, float(bn_momentum))
    if pretrained is not None:
        from cbam.interop.safe_load import read_checkpoint

        state = read_checkpoint(pretrained).state_dict
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"{pretrained} does not fit {name}: {error}") from None
        set_head(model, num_classes)
    if in_chans != 3:
        adapt_first_conv(model, in_chans)
    if attach is not None:
        from cbam.interop.attach import attach as attach_attention

        attach_attention(
            model, attach, identity_init=identity_init, placement=placement,
            **dict(attention_kwargs or {}),
        )  # fmt: skip
    return model


def _build(source: str, arch: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    head = {} if num_classes is None else {"num_classes": num_classes}
    if source == "timm":
        import timm

        if arch not in timm.list_models():
            raise unknown_choice("timm model", arch, timm.list_models())
        return timm.create_model(arch, pretrained=False, **head, **kwargs)
    import torchvision
    from torchvision.models import detection, segmentation

    dense = [*torchvision.models.list_models(module=detection),
             *torchvision.models.list_models(module=segmentation)]  # fmt: skip
    names = [*torchvision.models.list_models(module=torchvision.models), *dense]
    if arch not in names:
        raise unknown_choice("torchvision model", arch, names)
    if arch in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": False, **kwargs}
    if arch in dense:  # nothing is downloaded: no backbone weights either
        kwargs = {"weights_backbone": None, **kwargs}
    return torchvision.models.get_model(arch, weights=None, **head, **kwargs)


def set_head(model: nn.Module, num_classes: int) -> None:
    """A new, freshly initialised classification layer for `num_classes` (timm: its own
    reset_classifier; torchvision: the last Linear, or SqueezeNet's last 1x1 conv)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    path, layer = last
    parent_path, _, attr = path.rpartition(".")
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    else:
        new = nn.Conv2d(layer.in_channels, num_classes, 1)
    setattr(model.get_submodule(parent_path), attr, new)


def adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """The first conv takes `in_chans` channels. For grey images (in_chans=1) its weights are
    summed over RGB, so a grey image gives exactly the activations the same image repeated
    into three channels gave: pretrained weights stay valid, and no batch is copied 3x."""
    path, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_chans:
        return
    if conv.groups != 1:
        raise ValueError(f"the first conv ({path}) is grouped; cannot adapt it to {in_chans}")
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, 1, conv.bias is not None, conv.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        if in_chans == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:  # spread the RGB filters' mean over the new channels, keeping the scale
            mean = conv.weight.mean(dim=1, keepdim=True) * conv.in_channels / in_chans
            new.weight.copy_(mean.expand(-1, in_chans, -1, -1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new.to(conv.weight.device))


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """torchvision's MobileNet V3 and EfficientNets use BN momentum 0.01, tuned for long
    ImageNet runs: after a few hundred steps their running statistics still remember the
    first batches, and eval-mode error is far above train error (measured: 64% test error at
    34% train error after 468 steps on Fashion-MNIST). 0.1, PyTorch's default, fixes that."""
    if not 0 < momentum <= 1:
        raise ValueError(f"bn_momentum must be in (0, 1], got {momentum}")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
