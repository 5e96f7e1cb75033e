"""cbam: paper-faithful Convolutional Block Attention Module (Woo et al., ECCV 2018)."""

from cbam.layers import (
    BAM,
    CBAM,
    SE,
    ChannelAttention,
    SpatialAttention,
    create_attention,
    list_attentions,
)
from cbam.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "BAM",
    "CBAM",
    "SE",
    "ChannelAttention",
    "SpatialAttention",
    "__version__",
    "create_attention",
    "create_model",
    "list_attentions",
    "list_models",
]
