"""Name -> attention layer, so models and configs can ask for attention by name."""

from collections.abc import Callable
from typing import Any

from torch import nn

from cbam._errors import unknown_choice
from cbam.layers.bam import BAM
from cbam.layers.cbam import CBAM
from cbam.layers.channel_attention import ChannelAttention
from cbam.layers.se import SE
from cbam.layers.spatial_attention import SpatialAttention

ATTENTION_LAYERS: dict[str, type[nn.Module]] = {
    "cbam": CBAM,
    "se": SE,
    "bam": BAM,
    "channel": ChannelAttention,
    "spatial": SpatialAttention,
}

AttentionSpec = str | Callable[..., nn.Module] | None


def list_attentions() -> list[str]:
    return list(ATTENTION_LAYERS)


def get_attention(attention: AttentionSpec) -> Callable[..., nn.Module] | None:
    """Resolve a name (or a class / factory taking `channels` first) to a layer factory."""
    if attention is None or attention == "none":
        return None
    if isinstance(attention, str):
        if attention not in ATTENTION_LAYERS:
            raise unknown_choice("attention", attention, ["none", *ATTENTION_LAYERS])
        return ATTENTION_LAYERS[attention]
    if callable(attention):
        return attention
    raise TypeError(
        f"attention must be None, a name from {list_attentions()} or a callable taking "
        f"channels first, got {type(attention).__name__}"
    )


def create_attention(attention: AttentionSpec, channels: int, **kwargs: Any) -> nn.Module | None:
    """Build `attention` for a `channels`-channel feature map; None when attention is None."""
    factory = get_attention(attention)
    return None if factory is None else factory(channels, **kwargs)
