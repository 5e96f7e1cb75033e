"""ResNet blocks that have a named slot for attention: torchvision's, timm's and cbam's.

For these, `attach` uses the slot rather than a wrapper, so an attached model has exactly
the state-dict names of cbam's own ResNets (`layer1.0.attention.*`) and of the CBAM
authors' checkpoints, and timm's SE-ResNets get CBAM in their `se` slot. The place is the
same one the general "residual" placement finds: the last BN's output, before the add.
Blocks are recognised by their exact class, never by name: a subclass may compute
something else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

SUPPORTED = (
    "torchvision.models.resnet.BasicBlock / Bottleneck (torchvision's resnet18-152, "
    "resnext*, wide_resnet*)",
    "timm.models.resnet.BasicBlock / Bottleneck (timm's resnet*, resnext*, wide_resnet*, "
    "seresnet*, ecaresnet*, resnet*d, ...; the layer goes in the block's `se` slot)",
    "cbam.models.resnet.BasicBlock / Bottleneck (cbam's own ResNets built without attention)",
)


@dataclass
class Slot:
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

    def fill(self, layer: nn.Module) -> None:
        if self.swap_to is not None:
            self.block.__class__ = self.swap_to
        setattr(self.block, self.attr, layer)


def find_slots(model: nn.Module) -> list[Slot]:
    from cbam.models.resnet import BasicBlock, Bottleneck

    families: list[tuple[tuple[type, ...], str, dict[type, type[nn.Module]]]] = [
        ((BasicBlock, Bottleneck), "attention", {})
    ]
    if "torchvision.models.resnet" in sys.modules:  # a torchvision model needs it imported
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
                slots.append(Slot(name, module, attr, swap.get(type(module))))
    return slots
