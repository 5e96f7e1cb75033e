"""The CBAM authors' checkpoint names (Jongchan/attention-module) and ours.

Their ResNet keeps torchvision's names for the backbone and calls each block's module
`cbam`, with `ChannelGate.mlp` = Sequential(Flatten, Linear, ReLU, Linear), so its Linear
layers are `mlp.1` and `mlp.3`, and `SpatialGate.spatial` = BasicConv(conv, bn). Ours call
the module `attention`, with `channel.mlp` = Sequential(Linear, ReLU, Linear) and
`spatial.conv` / `spatial.bn`. The computation is the same (REFERENCE.md section 1), so
renaming is all a conversion needs. The `module.` prefix of their DataParallel checkpoints is
removed when the file is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# (authors' name fragment, ours), matched as ".<fragment>." inside a key.
OFFICIAL_TO_CBAM = (
    ("cbam.ChannelGate.mlp.1", "attention.channel.mlp.0"),
    ("cbam.ChannelGate.mlp.3", "attention.channel.mlp.2"),
    ("cbam.SpatialGate.spatial.conv", "attention.spatial.conv"),
    ("cbam.SpatialGate.spatial.bn", "attention.spatial.bn"),
)


def is_official(keys: Iterable[str]) -> bool:
    """Whether state-dict keys use the authors' CBAM names (`...cbam.ChannelGate...`)."""
    return any(".cbam.ChannelGate." in k or ".cbam.SpatialGate." in k for k in keys)


def official_to_cbam_key(key: str) -> str:
    """Our name for one of the authors' keys; keys without CBAM parts are unchanged."""
    for theirs, ours in OFFICIAL_TO_CBAM:
        fragment = f".{theirs}."
        if fragment in key:
            return key.replace(fragment, f".{ours}.")
    return key


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' state dict with our names: `...cbam.ChannelGate.mlp.1.weight` becomes
    `...attention.channel.mlp.0.weight`, and so on. A leading `module.` is removed.
    Keys that match nothing keep their names, so a strict load reports them as unexpected."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        out[official_to_cbam_key(name)] = value
    return out
