"""Pieces every backbone shares: attention placement, weight init, input checks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cbam._errors import unknown_kwargs
from cbam.layers import BAM, ChannelAttention, SpatialAttention, get_attention
from cbam.layers.create_attention import AttentionSpec

AttentionBuilder = Callable[..., nn.Module]  # (channels, **site) -> layer


def attention_builders(
    attention: AttentionSpec, attention_kwargs: Mapping[str, Any] | None
) -> tuple[AttentionBuilder | None, AttentionBuilder | None]:
    """(per-block builder, per-stage-boundary builder) for an attention spec.

    Where a layer goes is its `placement` class attribute: "block" (SE, CBAM: inside every
    residual block) or "stage" (BAM: once between stages). Exactly one of the two is set,
    or neither when attention is None.
    """
    factory = get_attention(attention)
    kwargs = dict(attention_kwargs or {})
    if factory is None:
        if kwargs:
            raise ValueError(
                f"attention_kwargs {kwargs} were given but attention is None; "
                f"pick an attention (e.g. attention='cbam') or drop attention_kwargs"
            )
        return None, None
    if inspect.isclass(factory):
        accepted = list(inspect.signature(factory.__init__).parameters)[2:]  # not self, channels
        error = unknown_kwargs(f"attention {factory.__name__}", kwargs, accepted)
        if error is not None:
            raise error

    def build(channels: int, **site: Any) -> nn.Module:  # site: e.g. spatial_dims=3
        return factory(channels, **{**kwargs, **site})

    if getattr(factory, "placement", "block") == "stage":
        return None, build
    return build, None


def init_weights(model: nn.Module) -> None:
    """Kaiming (fan-out) convs and unit BNs, as torchvision and the authors' code do; then the
    attention layers re-apply their own init (e.g. CBAM's spatial BN weight starts at 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, (ChannelAttention, SpatialAttention, BAM)):
            m.reset_parameters()


def check_image_batch(x: torch.Tensor, in_chans: int, model: str) -> None:
    if x.dim() == 4 and x.shape[1] == in_chans:
        return
    if x.dim() == 3:
        fix = "add the batch axis with x.unsqueeze(0)"
    elif x.dim() == 4:
        fix = f"create the model with in_chans={x.shape[1]} for {x.shape[1]}-channel images"
    else:
        fix = "pass a 4-D batch of images"
    raise ValueError(
        f"{model} expects images as N x {in_chans} x H x W, got shape {list(x.shape)}; {fix}"
    )


class ClassifierMixin:
    """timm-style head API shared by the backbones: forward_features -> forward_head."""

    fc: nn.Module
    num_features: int

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier (skipped with pre_logits=True)."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes` (0: no head, features out)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]
