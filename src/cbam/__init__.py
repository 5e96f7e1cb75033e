"""cbam: paper-faithful Convolutional Block Attention Module (Woo et al., ECCV 2018)."""

from cbam.interop import (
    CheckpointError,
    IdentityBlend,
    LoadReport,
    attach,
    attach_report,
    export_model,
    load_checkpoint,
    load_official,
    load_torchvision,
    read_checkpoint,
    verify_export,
)
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
    "CheckpointError",
    "IdentityBlend",
    "LoadReport",
    "SpatialAttention",
    "__version__",
    "attach",
    "attach_report",
    "create_attention",
    "create_model",
    "export_model",
    "list_attentions",
    "list_models",
    "load_checkpoint",
    "load_official",
    "load_torchvision",
    "read_checkpoint",
    "verify_export",
]
