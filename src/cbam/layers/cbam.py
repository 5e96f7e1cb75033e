"""CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention."""

from collections.abc import Sequence

import torch
from torch import nn

from cbam._errors import unknown_choice
from cbam.layers.channel_attention import ChannelAttention
from cbam.layers.spatial_attention import SPATIAL_METHODS, SpatialAttention

ORDERS = ("channel_spatial", "spatial_channel", "parallel")


class CBAM(nn.Module):
    """Convolutional Block Attention Module with every variant the paper ablates.

    The defaults are the paper's module as the authors' code builds it: avg + max pooling into
    one shared MLP (r = 16, with biases), then [max, mean] channel pooling into a 7x7 conv, BN
    (weight initialised to 0) and sigmoid, applied channel first.

    Args:
        channels: channels of the feature map this module refines.
        reduction: MLP bottleneck ratio r (hidden width channels // r).
        pool_types: any non-empty subset of "avg", "max", "lp", "lse" for channel attention.
        spatial: "pool" (channel max + mean), "conv1x1" (learned C -> 1 compression) or None
            (channel attention only).
        kernel_size: odd size of the spatial conv (7 in the paper, 3 in its ablation).
        order: "channel_spatial" (the paper's), "spatial_channel", or "parallel": both gates
            computed from the same input and multiplied in, x * Mc(x) * Ms(x). The paper does
            not spell out its parallel variant; this is the one that keeps the two sigmoid
            gates unchanged and differs from the sequential orders only in what Ms sees.
    """

    placement = "block"

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        pool_types: Sequence[str] = ("avg", "max"),
        spatial: str | None = "pool",
        kernel_size: int = 7,
        order: str = "channel_spatial",
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise unknown_choice("order", order, ORDERS)
        if spatial is not None and spatial not in SPATIAL_METHODS:
            raise unknown_choice("spatial method", spatial, (*SPATIAL_METHODS, "None"))
        if spatial is None and order != "channel_spatial":
            raise ValueError(
                f"order={order!r} needs spatial attention, but spatial=None turns it off; "
                f"leave order at its default for channel attention only"
            )
        self.order = order
        self.channel = ChannelAttention(channels, reduction, pool_types)
        self.spatial = SpatialAttention(channels, kernel_size, spatial) if spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is None:
            return x * self.channel.gate(x)
        if self.order == "channel_spatial":
            x = x * self.channel.gate(x)
            return x * self.spatial.gate(x)
        if self.order == "spatial_channel":
            x = x * self.spatial.gate(x)
            return x * self.channel.gate(x)
        return x * self.channel.gate(x) * self.spatial.gate(x)

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
