"""Global and channel-wise pooling written as plain reductions.

`mean`/`amax` instead of `AdaptiveAvgPool2d`/`AdaptiveMaxPool2d`: they export to ONNX as
ReduceMean/ReduceMax rather than MaxPool, keep a dynamic batch axis, and have deterministic
backward passes on CUDA.
"""

import torch
from torch import nn

from cbam._errors import unknown_choice

POOL_TYPES = ("avg", "max", "lp", "lse")


def global_pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """Pool an N x C x ... tensor over all its spatial axes (L; H, W; or D, H, W) to N x C.

    "lp" is the authors' power-2 LP pool (the L2 norm over the map) and "lse" their
    log-sum-exp pool; both are computed in float32 (float64 for float64 maps), so large
    fp16/bf16 activations stay finite.
    """
    dims = [d for d in range(2, x.dim())]
    if pool_type == "avg":
        return x.mean(dim=dims)
    if pool_type == "max":
        return x.amax(dim=dims)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if pool_type == "lp":
        return torch.linalg.vector_norm(x, ord=2, dim=dims, dtype=acc).to(x.dtype)
    if pool_type == "lse":
        return torch.logsumexp(x.flatten(2).to(acc), dim=2).to(x.dtype)
    raise ValueError(f"unknown pool type '{pool_type}'; expected one of avg, max, lp, lse")


def check_pool_types(pool_types: object) -> tuple[str, ...]:
    """Validate a non-empty, duplicate-free collection of POOL_TYPES names."""
    if isinstance(pool_types, str):
        pool_types = (pool_types,)
    try:
        pools = tuple(pool_types)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"pool_types must be a sequence of names from {POOL_TYPES}, got {pool_types!r}"
        ) from None
    if not pools:
        raise ValueError(f"pool_types must name at least one of {POOL_TYPES}, got none")
    for pool in pools:
        if pool not in POOL_TYPES:
            raise unknown_choice("pool type", pool, POOL_TYPES)
    if len(set(pools)) != len(pools):
        raise ValueError(f"pool_types lists a pool twice: {pools}")
    return pools


class ChannelPool(nn.Module):
    """Max and mean over the channel axis, stacked as [max, mean] (the authors' order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
