"""Channel attention: which feature channels matter (CBAM's Mc)."""

from collections.abc import Sequence

import torch
from torch import nn

from cbam._checks import check_feature_map, check_spatial_dims, hidden_channels
from cbam.layers.pooling import check_pool_types, global_pool


class ChannelAttention(nn.Module):
    """sigmoid(sum over pools of MLP(pool(x))) scaling each channel, with ONE shared MLP.

    As in the authors' code, the MLP is Linear(C, C/r) -> ReLU -> Linear(C/r, C) with biases
    (so the output bias is added once per pool) and the biases start at zero. The gate goes
    through `self.sigmoid`, a module, so a forward hook on it sees the gate values. Pooling is
    over every spatial axis: `spatial_dims` 1 (N x C x L), 2 (N x C x H x W, the paper's) or
    3 (N x C x D x H x W).
    """

    placement = "block"

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        pool_types: Sequence[str] = ("avg", "max"),
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        hidden = hidden_channels(channels, reduction, type(self).__name__)
        self.channels = channels
        self.spatial_dims = check_spatial_dims(spatial_dims, type(self).__name__)
        self.layer_name = type(self).__name__
        self.pool_types: list[str] = list(check_pool_types(pool_types))
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.sigmoid = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.mlp[0], self.mlp[2]):
            layer.reset_parameters()
            nn.init.zeros_(layer.bias)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The N x C x 1 (x 1 (x 1)) channel gate for `x`, values in (0, 1)."""
        check_feature_map(x, self.channels, self.layer_name, self.spatial_dims)
        pooled = torch.stack([global_pool(x, pool) for pool in self.pool_types])
        logits = self.mlp(pooled).sum(dim=0)  # one batched MLP call for all pools
        return self.sigmoid(logits).reshape(list(logits.shape) + [1] * self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def extra_repr(self) -> str:
        dims = "" if self.spatial_dims == 2 else f", spatial_dims={self.spatial_dims}"
        return f"pool_types={tuple(self.pool_types)}{dims}"
