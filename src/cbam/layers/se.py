"""Squeeze-and-excitation (Hu et al. 2018), the paper's main baseline."""

from cbam.layers.channel_attention import ChannelAttention


class SE(ChannelAttention):
    """avgpool -> Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> sigmoid: channel attention with
    average pooling only, which is exactly the "avg" row of the paper's pooling ablation."""

    def __init__(self, channels: int, reduction: int = 16, spatial_dims: int = 2) -> None:
        super().__init__(channels, reduction, pool_types=("avg",), spatial_dims=spatial_dims)
