"""Insert attention into an existing torchvision, timm or cbam ResNet, keeping its weights.

The layer goes where the paper puts it (REFERENCE.md section 2): on the output of each
residual block's last BN, before the residual addition. Blocks are recognised by their
exact class, never by name, because a subclass may compute something else.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from cbam.interop.identity_blend import IdentityBlend
from cbam.layers.create_attention import AttentionSpec
from cbam.models._common import attention_builders

SUPPORTED = (
    "torchvision.models.resnet.BasicBlock / Bottleneck (torchvision's resnet18-152, "
    "resnext*, wide_resnet*)",
    "timm.models.resnet.BasicBlock / Bottleneck (timm's resnet*, resnext*, wide_resnet*, "
    "seresnet*, ecaresnet*, resnet*d, ...; the layer goes in the block's `se` slot)",
    "cbam.models.resnet.BasicBlock / Bottleneck (cbam's own ResNets built without attention)",
)


@dataclass
class _Slot:
    name: str
    block: nn.Module
    attr: str  # the block attribute that holds the attention layer
    swap_to: type[nn.Module] | None  # torchvision blocks: the class with an attention call

    @property
    def existing(self) -> nn.Module | None:
        if self.swap_to is not None:
            return None
        layer = getattr(self.block, self.attr, None)
        return None if isinstance(layer, nn.Identity) else layer

    @property
    def channels(self) -> int:
        last_conv = self.block.conv3 if hasattr(self.block, "conv3") else self.block.conv2
        return int(last_conv.out_channels)


def attach(
    model: nn.Module,
    attention: AttentionSpec = "cbam",
    *,
    identity_init: bool = False,
    replace: bool = False,
    **attention_kwargs: Any,
) -> nn.Module:
    """Add `attention` to every residual block of `model` (in place) and return the model.

    The pretrained weights stay where they are, under their own names; the new layers are
    named `<block>.attention` (`<block>.se` in timm models). With the default
    `identity_init=False` each block gets the paper's module with the paper's init, which
    scales every residual branch by roughly 0.25 at first (both sigmoid gates start near
    0.5), so the network must be fine-tuned. `identity_init=True` wraps each layer in an
    `IdentityBlend` (x + alpha * (attention(x) - x), alpha = 0 at first), so the outputs are
    exactly the original network's until training moves alpha; at alpha = 1 it is the
    paper's module. `replace=True` swaps out attention the blocks already have (e.g. timm
    SE-ResNets), dropping its weights. Keyword arguments go to the attention layer
    (e.g. kernel_size=3).
    """
    build, stage_build = attention_builders(attention, attention_kwargs)
    if build is None:
        if stage_build is not None:
            raise ValueError(
                "attach puts attention inside residual blocks, but this attention (BAM) goes "
                "between stages; use 'cbam', 'se', 'channel', 'spatial' or a callable"
            )
        raise ValueError("attention=None attaches nothing; pick e.g. attention='cbam'")
    slots = _find_blocks(model)
    if not slots:
        raise ValueError(_unsupported(model))
    taken = [s for s in slots if s.existing is not None]
    if taken and not replace:
        kind = type(taken[0].existing).__name__
        names = ", ".join(s.name for s in taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise ValueError(
            f"{len(taken)} block(s) already have attention ({kind} in {names}); pass "
            f"replace=True to swap it for "
            f"{attention!r} (its weights are dropped)"
        )
    layers = [_build_layer(build, slot, identity_init) for slot in slots]  # may raise: nothing
    for slot, layer in zip(slots, layers, strict=True):  # changed until every layer is built
        if slot.swap_to is not None:
            slot.block.__class__ = slot.swap_to
        setattr(slot.block, slot.attr, layer)
    return model


def _build_layer(build: Callable[[int], nn.Module], slot: _Slot, identity_init: bool) -> nn.Module:
    layer = build(slot.channels)
    if identity_init:
        layer = IdentityBlend(layer)
    weight = next(slot.block.parameters())
    return layer.to(device=weight.device, dtype=weight.dtype).train(slot.block.training)


def _find_blocks(model: nn.Module) -> list[_Slot]:
    from cbam.models.resnet import BasicBlock, Bottleneck

    families: list[tuple[tuple[type, ...], str, dict[type, type[nn.Module]]]] = [
        ((BasicBlock, Bottleneck), "attention", {})
    ]
    torchvision_resnet = sys.modules.get("torchvision.models.resnet")
    if torchvision_resnet is not None:  # a torchvision model can only exist once it's imported
        from cbam.interop._torchvision_blocks import WITH_ATTENTION

        families.append((tuple(WITH_ATTENTION), "attention", WITH_ATTENTION))
        families.append((tuple(WITH_ATTENTION.values()), "attention", {}))
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is not None:
        families.append(((timm_resnet.BasicBlock, timm_resnet.Bottleneck), "se", {}))
    slots = []
    for name, module in model.named_modules():
        for classes, attr, swap in families:
            if type(module) in classes:
                slots.append(_Slot(name, module, attr, swap.get(type(module))))
    return slots


def _unsupported(model: nn.Module) -> str:
    lookalikes = sorted(
        {
            f"{type(m).__module__}.{type(m).__name__}"
            for m in model.modules()
            if "block" in type(m).__name__.lower() or "bottleneck" in type(m).__name__.lower()
        }
    )
    found = ""
    if lookalikes:
        found = f" It has blocks of type {', '.join(lookalikes)}, which attach does not know."
    return (
        f"attach found no residual block it supports in {type(model).__name__}.{found} "
        f"Supported: {'; '.join(SUPPORTED)}. For other architectures, put cbam.CBAM(channels) "
        f"into your own module's forward."
    )
