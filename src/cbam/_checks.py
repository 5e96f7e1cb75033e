"""Checks run on every attention layer's input, scriptable so layers stay TorchScript-friendly."""

import torch
from torch import nn

from cbam._errors import check_positive_int

SPATIAL_DIMS = (1, 2, 3)
# The conv and BatchNorm classes a layer of each spatial dimensionality is built from.
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_spatial_dims(spatial_dims: object, layer: str) -> int:
    """1 (signals, N x C x L), 2 (images, N x C x H x W) or 3 (volumes and video,
    N x C x D x H x W)."""
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise ValueError(
            f"{layer}: spatial_dims must be 1 (N x C x L signals), 2 (N x C x H x W images) or "
            f"3 (N x C x D x H x W volumes and video), got {spatial_dims!r}"
        )
    return int(spatial_dims)  # type: ignore[call-overload]


def _axes(spatial_dims: int) -> str:
    if spatial_dims == 1:
        return "L"
    if spatial_dims == 3:
        return "D x H x W"
    return "H x W"


def check_feature_map(x: torch.Tensor, channels: int, layer: str, spatial_dims: int = 2) -> None:
    """Fail with expected-vs-actual when `x` is not an N x `channels` x (spatial_dims axes)
    tensor with every spatial axis >= 1. N = 0 (an empty batch) passes: it flows through as
    an empty result."""
    dims = 2 + spatial_dims
    if x.dim() != dims:
        hint = "; add the batch axis with x.unsqueeze(0) for a single sample"
        if 3 <= x.dim() <= 5:
            other = f"build the layer with spatial_dims={x.dim() - 2} for this input"
            hint = hint + ", or " + other if x.dim() == dims - 1 else "; " + other
        raise ValueError(
            f"{layer} expects a {dims}-D N x C x {_axes(spatial_dims)} tensor, got "
            f"{x.dim()}-D with shape {list(x.shape)}{hint}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{layer} was built for {channels} channels but the input has {x.shape[1]} "
            f"(shape {list(x.shape)}); build it with channels={x.shape[1]} or feed it "
            f"the feature map it was made for"
        )
    sizes = x.shape[2:]
    for size in sizes:
        if size == 0:
            raise ValueError(
                f"{layer} needs a feature map of at least 1 x 1, got "
                f"{' x '.join([str(s) for s in sizes])} (shape {list(x.shape)}): its pools "
                f"have nothing to pool; the input is too small for the network's "
                f"downsampling, so feed larger inputs"
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
