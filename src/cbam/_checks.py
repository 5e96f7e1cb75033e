"""Checks run on every attention layer's input, scriptable so layers stay TorchScript-friendly."""

import torch

from cbam._errors import check_positive_int


def check_feature_map(x: torch.Tensor, channels: int, layer: str) -> None:
    """Fail with expected-vs-actual when `x` is not an N x `channels` x H x W tensor with
    H, W >= 1. N = 0 (an empty batch) passes: it flows through as an empty result."""
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
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(
            f"{layer} needs a feature map of at least 1 x 1, got {x.shape[2]} x {x.shape[3]} "
            f"(shape {list(x.shape)}): its pools have nothing to pool; the input image is "
            f"too small for the network's downsampling, so feed larger images"
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
