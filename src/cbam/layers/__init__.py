"""Attention layers. Each takes `channels` first and works on any N x C x H x W tensor."""

from cbam.layers.bam import BAM
from cbam.layers.cbam import CBAM, IMPLS, ORDERS, set_cbam_impl
from cbam.layers.channel_attention import ChannelAttention
from cbam.layers.create_attention import (
    ATTENTION_LAYERS,
    create_attention,
    get_attention,
    list_attentions,
)
from cbam.layers.pooling import POOL_TYPES, ChannelPool, global_pool
from cbam.layers.se import SE
from cbam.layers.spatial_attention import SPATIAL_METHODS, SpatialAttention

__all__ = [
    "ATTENTION_LAYERS",
    "BAM",
    "CBAM",
    "IMPLS",
    "ORDERS",
    "POOL_TYPES",
    "SE",
    "SPATIAL_METHODS",
    "ChannelAttention",
    "ChannelPool",
    "SpatialAttention",
    "create_attention",
    "get_attention",
    "global_pool",
    "list_attentions",
    "set_cbam_impl",
]
