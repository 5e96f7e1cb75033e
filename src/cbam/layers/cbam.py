"""CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cbam import kernels
from cbam._errors import unknown_choice
from cbam.layers.channel_attention import ChannelAttention
from cbam.layers.spatial_attention import SPATIAL_METHODS, SpatialAttention

ORDERS = ("channel_spatial", "spatial_channel", "parallel")
IMPLS = ("auto", "reference", "fused")


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
        impl: "auto" (default): the fused implementation (`cbam.kernels`: same values and
            gradients, less memory and time) wherever it applies, else the reference;
            "reference": always the paper's equations as separate ops; "fused": like "auto",
            but a variant the fused path cannot compute (lp/lse pooling, spatial_channel) is
            an error. Both fused modes run the reference when a forward hook (or any other
            module hook) sits on a submodule such as `channel.sigmoid`, so hooks always see the
            gates; and under tracing, export, TorchScript, and deterministic CUDA. Under
            autocast the fused path keeps the map in the dtype autocast gave it (bf16 / fp16)
            and accumulates in fp32 (`kernels.autocast_off`).
            Change it later with `module.impl = ...` or `set_cbam_impl(model, ...)`.
        spatial_dims: 2 (default) for N x C x H x W images; 1 for N x C x L signals, 3 for
            N x C x D x H x W volumes and video: pooling over every spatial axis, a k or
            k x k x k spatial conv with a 1-D or 3-D BatchNorm. The fused kernels are 2-D:
            other dims run the reference path (`impl="fused"` is then an error).
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
        impl: str = "auto",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise unknown_choice("impl", impl, IMPLS)
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
        self.spatial_dims = spatial_dims
        self.channel = ChannelAttention(channels, reduction, pool_types, spatial_dims)
        self.spatial = (
            SpatialAttention(channels, kernel_size, spatial, spatial_dims) if spatial else None
        )
        reason = kernels.fused_unsupported_reason(self.channel.pool_types, order, spatial_dims)
        if impl == "fused" and reason is not None:
            raise ValueError(
                f"impl='fused' cannot compute {reason}; use impl='auto' to fall back to the "
                f"reference implementation for this variant"
            )
        self.fused_supported = reason is None
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._use_fused(x, False):
            return self._fused_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's equations as separate ops (REFERENCE.md section 1)."""
        if self.spatial is None:
            return x * self.channel.gate(x)
        if self.order == "channel_spatial":
            x = x * self.channel.gate(x)
            return x * self.spatial.gate(x)
        if self.order == "spatial_channel":
            x = x * self.spatial.gate(x)
            return x * self.channel.gate(x)
        return x * self.channel.gate(x) * self.spatial.gate(x)

    @torch.jit.unused
    def _use_fused(self, x: torch.Tensor, hooks_on_self: bool = False) -> bool:
        """Whether this call may take the fused path (see `impl` in the class docstring)."""
        if self.impl == "reference" or not self.fused_supported:
            return False
        if x.dim() != 4 or x.shape[1] != self.channel.channels or not x.is_floating_point():
            return False  # the reference path raises the helpful error or handles it
        if x.numel() == 0:  # an empty batch flows through the reference; a 0-size map is refused
            return False
        if not kernels.fused_applies(x):
            return False
        return not kernels.has_hooks(*([self] if hooks_on_self else self._modules.values()))

    @torch.jit.unused
    def _fused_params(self) -> list[Any]:
        """Parameters and settings in the order `FusedCBAM` takes them."""
        mlp = self.channel.mlp._modules  # the Sequential's dict: indexing it is slow
        fc1, fc2 = mlp["0"], mlp["2"]
        params: list[Any] = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]  # type: ignore[union-attr]
        sp = self.spatial
        if sp is None:
            params += [None] * 6 + [tuple(self.channel.pool_types), False, 0, False, 0.0, 0.0]
            return params
        compress = sp.compress.weight if isinstance(sp.compress, nn.Conv2d) else None
        use_batch, factor, rm, rv = kernels.batch_norm_settings(sp.bn)
        params += [compress, sp.conv.weight, sp.bn.weight, sp.bn.bias, rm, rv]
        params += [tuple(self.channel.pool_types), self.order == "parallel", sp.conv.padding[0]]
        params += [use_batch, factor, sp.bn.eps]
        return params

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        with kernels.autocast_off(x):
            return kernels.forward(x, self._fused_params())

    @torch.jit.unused
    def fused_residual(
        self,
        pre_bn: torch.Tensor,
        bn: nn.Module,
        identity: torch.Tensor,
        *others: nn.Module,
        pre_bn_scratch: bool = False,
    ) -> torch.Tensor | None:
        """relu(self(bn(pre_bn)) + identity), a residual block's tail, fused; None when the
        fused path does not apply (then run the separate modules). `others` are further
        modules the caller would have run (e.g. its ReLU), checked for hooks.
        `pre_bn_scratch`: nothing else holds pre_bn; without autograd the output may then
        overwrite it (`kernels.block_tail`)."""
        if type(bn) is not nn.BatchNorm2d or kernels.has_hooks(bn, *others):
            return None
        if identity.shape != pre_bn.shape or identity.dtype != pre_bn.dtype:
            return None
        if not self._use_fused(pre_bn, hooks_on_self=True):
            return None
        with kernels.autocast_off(pre_bn):
            return kernels.block_tail(pre_bn, bn, identity, self._fused_params(), pre_bn_scratch)

    def extra_repr(self) -> str:
        dims = "" if self.spatial_dims == 2 else f", spatial_dims={self.spatial_dims}"
        return f"order={self.order!r}, impl={self.impl!r}{dims}"


def set_cbam_impl(module: nn.Module, impl: str) -> int:
    """Set `impl` on every CBAM inside `module` (itself included); returns how many.

    "fused" on a variant the fused path cannot compute raises, as the constructor does."""
    if impl not in IMPLS:
        raise unknown_choice("impl", impl, IMPLS)
    layers = [m for m in module.modules() if isinstance(m, CBAM)]
    for layer in layers:
        if impl == "fused" and not layer.fused_supported:
            raise ValueError(
                f"impl='fused' cannot compute {layer}; use impl='auto' to fall back to the "
                f"reference implementation for this variant"
            )
        layer.impl = impl
    return len(layers)
