"""Spatial attention: where in the feature map to look (CBAM's Ms)."""

import torch
from torch import nn

from cbam._checks import BATCH_NORM, CONV, check_feature_map, check_spatial_dims
from cbam._errors import check_positive_int, unknown_choice
from cbam.layers.pooling import ChannelPool

SPATIAL_METHODS = ("pool", "conv1x1")


class SpatialAttention(nn.Module):
    """sigmoid(BN(conv_k(compress(x)))) scaling each position.

    `method="pool"` compresses channels by [max, mean] channel pooling (the paper's choice);
    `"conv1x1"` by a learned 1x1 conv C -> 1 (the ablation's alternative). The k x k conv has
    no bias and is followed by BatchNorm2d(1, momentum=0.01) whose weight starts at 0, so a
    fresh gate is sigmoid(0) = 0.5 everywhere, as in the authors' code. `spatial_dims` 1 or 3
    makes the conv k or k x k x k and the BatchNorm 1-D or 3-D, for N x C x L signals or
    N x C x D x H x W volumes and video.
    """

    placement = "block"

    def __init__(
        self, channels: int, kernel_size: int = 7, method: str = "pool", spatial_dims: int = 2
    ) -> None:
        super().__init__()
        check_positive_int("SpatialAttention: channels", channels)
        self.spatial_dims = check_spatial_dims(spatial_dims, "SpatialAttention")
        conv, batch_norm = CONV[spatial_dims], BATCH_NORM[spatial_dims]
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd so the gate keeps the input's size, got "
                f"{kernel_size}; the paper uses 7 (or 3 in its ablation)"
            )
        if method not in SPATIAL_METHODS:
            raise unknown_choice("spatial method", method, SPATIAL_METHODS)
        self.channels = channels
        self.method = method
        if method == "pool":
            self.compress: nn.Module = ChannelPool()
            compressed = 2
        else:
            self.compress = conv(channels, 1, kernel_size=1, bias=False)
            compressed = 1
        self.conv = conv(compressed, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = batch_norm(1, eps=1e-5, momentum=0.01)
        self.sigmoid = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv, self.compress):
            if isinstance(conv, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()
        nn.init.zeros_(self.bn.weight)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The N x 1 x H x W (L; D x H x W) spatial gate for `x`, values in (0, 1)."""
        check_feature_map(x, self.channels, "SpatialAttention", self.spatial_dims)
        return self.sigmoid(self.bn(self.conv(self.compress(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def extra_repr(self) -> str:
        dims = "" if self.spatial_dims == 2 else f", spatial_dims={self.spatial_dims}"
        return f"method={self.method!r}{dims}"
