"""CBAM's gates as the model computes them: forward hooks on the gates' `sigmoid` modules.

This is the layers' documented capture contract (README, "Use"): a hook on
`attention.channel.sigmoid` sees the N x C channel gate, one on `attention.spatial.sigmoid`
the N x 1 x H x W spatial gate. The hooks only read (they store detached copies), exist only
inside `GateRecorder`'s `with` block, and are removed on exit, so normal inference is untouched.
SE layers are channel attention too (`SE` subclasses `ChannelAttention`), so their channel
gates are captured the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from cbam.layers import CBAM, ChannelAttention, SpatialAttention


@dataclass
class BlockGates:
    """The gates of one attention module for the images seen while recording."""

    name: str  # the attention module, e.g. "layer2.1.attention"
    stage: str  # the stage it sits in, e.g. "layer2" ("" when the model has no feature_info)
    channel: torch.Tensor | None  # N x C, in (0, 1)
    spatial: torch.Tensor | None  # N x 1 x H x W at the block's resolution, in (0, 1)

    def select(self, rows: slice) -> BlockGates:
        """The gates of some of the images (a page of the figure)."""
        channel = None if self.channel is None else self.channel[rows]
        spatial = None if self.spatial is None else self.spatial[rows]
        return BlockGates(self.name, self.stage, channel, spatial)

    def spatial_at(self, size: tuple[int, int]) -> torch.Tensor:
        """The spatial gate upsampled (bilinear) to an image size: N x H x W, still in (0, 1)
        since bilinear interpolation only averages neighbouring gate values."""
        if self.spatial is None:
            raise ValueError(f"{self.name} has no spatial gate")
        return F.interpolate(self.spatial, size=size, mode="bilinear", align_corners=False)[:, 0]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module | None, nn.Module | None]]:
    """(name, channel attention, spatial attention) of every gated attention module in order:
    each CBAM, and each ChannelAttention (SE included) or SpatialAttention used on its own."""
    found: list[tuple[str, nn.Module | None, nn.Module | None]] = []
    inside_cbam: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, CBAM):
            found.append((name, module.channel, module.spatial))
            inside_cbam.update(id(m) for m in module.modules())
        elif id(module) in inside_cbam:
            continue
        elif isinstance(module, ChannelAttention):
            found.append((name, module, None))
        elif isinstance(module, SpatialAttention):
            found.append((name, None, module))
    return found


def has_gates(model: nn.Module) -> bool:
    """Whether the model has channel or spatial gates to capture (CBAM, SE, ...)."""
    return bool(attention_modules(model))


def _stage_of(name: str, stages: list[str]) -> str:
    matches = [s for s in stages if name == s or name.startswith(s + ".")]
    return max(matches, key=len) if matches else ""


class GateRecorder:
    """Records every gate while active: `with GateRecorder(model) as rec: model(x)`, then
    `rec.gates()`. Several forward passes inside one block are concatenated along the batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = attention_modules(model)
        if not self.modules:
            raise ValueError(
                f"{type(model).__name__} has no CBAM, channel or spatial attention to capture "
                f"gates from (built with attention='cbam'?)"
            )
        stages = [str(i["module"]) for i in getattr(model, "feature_info", [])]
        self.stages = {name: _stage_of(name, stages) for name, _, _ in self.modules}
        self._store: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, key: tuple[str, str]) -> Callable[..., None]:
        def store(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._store.setdefault(key, []).append(output.detach().clone())

        return store

    def __enter__(self) -> GateRecorder:
        self._store.clear()
        for name, channel, spatial in self.modules:
            for kind, part in (("channel", channel), ("spatial", spatial)):
                if part is not None:
                    hook = self._hook((name, kind))
                    self._handles.append(part.sigmoid.register_forward_hook(hook))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def gates(self) -> list[BlockGates]:
        """What was recorded, one entry per attention module in model order."""
        if not self._store:
            raise ValueError("no gates were recorded: run the model inside the `with` block")

        def joined(name: str, kind: str) -> torch.Tensor | None:
            parts = self._store.get((name, kind))
            return torch.cat(parts).float().cpu() if parts else None

        return [
            BlockGates(name, self.stages[name], joined(name, "channel"), joined(name, "spatial"))
            for name, _, _ in self.modules
        ]


def capture_gates(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, list[BlockGates]]:
    """(logits, gates) of `model` on `inputs`, without gradients, in the model's current mode."""
    recorder = GateRecorder(model)
    with torch.no_grad(), recorder:
        logits = torch.cat(
            [model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        )
    return logits, recorder.gates()


@dataclass
class GateStats:
    """Mean and spread of channel-gate values over images and channels (and blocks, for a
    stage): how far a channel gate is from a constant scale (a spread of 0)."""

    stage: str
    block: str  # "" for the row that pools a whole stage
    values: int
    mean: float
    std: float
    min: float
    max: float


def channel_gate_stats(gates: list[BlockGates]) -> list[GateStats]:
    """One row per block with a channel gate, then one per stage pooling its blocks."""
    rows: list[GateStats] = []
    by_stage: dict[str, list[torch.Tensor]] = {}

    def row(stage: str, block: str, values: torch.Tensor) -> GateStats:
        v = values.double().flatten()
        std = v.std(unbiased=False) if v.numel() > 1 else torch.zeros(())
        return GateStats(stage, block, v.numel(), v.mean().item(), std.item(),
                         v.min().item(), v.max().item())  # fmt: skip

    for g in gates:
        if g.channel is not None:
            rows.append(row(g.stage, g.name, g.channel))
            by_stage.setdefault(g.stage, []).append(g.channel.flatten())
    rows += [row(stage, "", torch.cat(values)) for stage, values in by_stage.items()]
    return rows
