"""BAM (Park et al., BMVC 2018), the authors' earlier module, placed between stages."""

import torch
from torch import nn

from cbam._checks import BATCH_NORM, CONV, check_feature_map, check_spatial_dims, hidden_channels
from cbam._errors import check_positive_int
from cbam.layers.pooling import global_pool


class BAM(nn.Module):
    """x * (1 + sigmoid(Mc(x) + Ms(x))) with the channel and spatial branches in parallel.

    Channel branch: avgpool -> Linear(C, C/r) -> BN -> ReLU -> Linear(C/r, C).
    Spatial branch: 1x1 conv to C/r -> BN -> ReLU -> two dilated 3x3 convs (each BN, ReLU)
    -> 1x1 conv to 1 channel. Models put one BAM at each stage boundary, not in every block.
    The channel branch's BatchNorm1d needs more than one sample per batch when training.
    `spatial_dims` 1 or 3 builds the spatial branch from 1-D or 3-D convs and BatchNorms.
    """

    placement = "stage"

    def __init__(
        self, channels: int, reduction: int = 16, dilation: int = 4, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        hidden = hidden_channels(channels, reduction, "BAM")
        check_positive_int("BAM: dilation", dilation)
        self.channels = channels
        self.spatial_dims = check_spatial_dims(spatial_dims, "BAM")
        conv, batch_norm = CONV[spatial_dims], BATCH_NORM[spatial_dims]
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        layers: list[nn.Module] = [conv(channels, hidden, 1), batch_norm(hidden), nn.ReLU(True)]
        for _ in range(2):
            layers += [
                conv(hidden, hidden, 3, padding=dilation, dilation=dilation),
                batch_norm(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(conv(hidden, 1, 1))
        self.spatial = nn.Sequential(*layers)
        self.sigmoid = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate 1 + sigmoid(Mc + Ms), x's shape, values in (1, 2)."""
        check_feature_map(x, self.channels, "BAM", self.spatial_dims)
        pooled = global_pool(x, "avg")
        channel_logits = self.channel_mlp(pooled).reshape(
            list(pooled.shape) + [1] * self.spatial_dims
        )
        return 1 + self.sigmoid(channel_logits + self.spatial(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)
