"""Checks run on every attention layer's input, scriptable so layers stay TorchScript-friendly."""

import torch
from torch import nn
from torch.nn.modules import module as _module

from cbam._errors import check_positive_int

_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks",
    "_global_backward_hooks", "_global_backward_pre_hooks",
)  # fmt: skip


def check_feature_map(x: torch.Tensor, channels: int, layer: str) -> None:
    """Fail with expected-vs-actual when `x` is not an N x `channels` x H x W tensor."""
    if x.dim() != 4:
        raise ValueError(
            f"{layer} expects a 4-D N x C x H x W tensor, got {x.dim()}-D with shape "
            f"{list(x.shape)}; add the batch axis with x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{layer} was built for {channels} channels but the input has {x.shape[1]} "
            f"(shape {list(x.shape)}); build it with channels={x.shape[1]} or feed it "
            f"the feature map it was made for"
        )


def hidden_channels(channels: int, reduction: int, layer: str) -> int:
    """Width of a channel-attention bottleneck: channels // reduction, which must be >= 1."""
    check_positive_int(f"{layer}: channels", channels)
    check_positive_int(f"{layer}: reduction", reduction)
    if reduction > channels:
        raise ValueError(
            f"{layer}: reduction={reduction} is larger than channels={channels}, which "
            f"leaves channels // reduction = 0 hidden units; use reduction <= {channels}"
        )
    return channels // reduction


def has_hooks(*modules: nn.Module) -> bool:
    """Whether any hook would fire inside `modules` (or their submodules): module hooks, or
    global ones from `torch.nn.modules.module.register_module_forward_hook` and friends.
    A plain loop over `_modules`: it runs on every forward, so it must cost microseconds."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return True
    stack = list(modules)
    for m in stack:  # the list grows with the children as it goes
        if m is None:  # an empty slot in a parent's _modules
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return True
        if m._backward_pre_hooks:
            return True
        stack += m._modules.values()
    return False
