"""One recorded forward pass: which module produced each feature map, the residual adds and
channel gates, and whether the network attends over tokens.

`torch.fx` cannot trace many real models (data-dependent branches, dict outputs, timm's
checks), so the structure is read from an ordinary eval-mode forward pass on a small input
instead: module hooks give each module's input and output tensors, and a TorchFunctionMode
sees every tensor operation in between (adds, multiplies, convolutions, softmax). Tensors
are told apart by identity; they are all kept alive until the trace ends, so no id is reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# Feature maps: N x C x L (1-D signals), N x C x H x W (images), N x C x D x H x W (video).
MAP_DIMS = (3, 4, 5)
ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
MULS = {"mul", "mul_", "__mul__", "__imul__", "__rmul__"}
# Operations that count as one layer of depth along a path (to tell skip from branch).
LAYERS = {"conv2d", "conv1d", "conv3d", "linear", "conv_transpose2d"}
# Operations of attention over tokens, the mark of a transformer (a softmax only when it is
# over an N x N score matrix: CNNs use softmax too).
TOKEN_ATTENTION = {
    "softmax", "_softmax", "scaled_dot_product_attention", "multi_head_attention_forward",
    "_native_multi_head_attention",
}  # fmt: skip


@dataclass
class ModuleCall:
    """A module's first call in the trace."""

    path: str
    order: int  # position among finished calls (inner modules finish first)
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    has_parameters: bool = False
    count: int = 1  # calls in the pass: a module called twice cannot be wrapped for one call


@dataclass
class ResidualAdd:
    """`a + b` of two same-shaped feature maps (N x C x ...), inside module `block`."""

    block: str
    shape: tuple[int, ...]
    depths: tuple[int, int]  # layers (convs, linears) on each operand's path
    producers: tuple[list[str], list[str]]  # modules that returned each operand, innermost first


@dataclass
class ChannelGate:
    """A module whose output is its input times an N x C x 1 x 1 gate: SE and its kin."""

    path: str
    channels: int
    spatial_dims: int = 2


@dataclass
class Trace:
    calls: dict[str, ModuleCall] = field(default_factory=dict)
    adds: list[ResidualAdd] = field(default_factory=list)
    gates: list[ChannelGate] = field(default_factory=list)
    token_attention: list[str] = field(default_factory=list)  # modules that ran a softmax
    outermost: dict[str, str] = field(default_factory=dict)  # path -> last module returning
    # the same tensor (layer2.1 -> layer2: a stage's last block returns the stage's output)


def trace_model(model: nn.Module, example: torch.Tensor) -> Trace:
    """Run `model(example)` once in eval mode without gradients, recording its structure."""
    recorder = _Recorder(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder.hooks(), recorder:
            model(example)
    finally:
        model.train(was_training)
    for paths in recorder.producers.values():
        outer = [p for p in paths if p]
        for path in outer:
            recorder.trace.outermost[path] = outer[-1]
    return recorder.trace


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.trace = Trace()
        self.stack: list[str] = []
        self.inputs: list[Any] = []
        self.keep: list[torch.Tensor] = []  # keeps every seen tensor alive: ids stay unique
        self.depth: dict[int, int] = {}
        self.producers: dict[int, list[str]] = {}
        # product id -> (input id, channels, spatial dims)
        self.gated: dict[int, tuple[int, int, int]] = {}

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        for path, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._enter(path)))
            handles.append(module.register_forward_hook(self._leave(path)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.stack.append(path)
            if isinstance(module, nn.MultiheadAttention):
                self.trace.token_attention.append(path)
            self.inputs.append(args[0] if args else None)

        return hook

    def _leave(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.stack.pop()
            given = self.inputs.pop()
            if isinstance(output, torch.Tensor):
                self._see(output)
                self.producers.setdefault(id(output), []).append(path)
                gate = self.gated.get(id(output))
                if gate is not None and isinstance(given, torch.Tensor) and gate[0] == id(given):
                    self.trace.gates.append(ChannelGate(path, gate[1], gate[2]))
                    del self.gated[id(output)]
            if path in self.trace.calls:
                self.trace.calls[path].count += 1
            else:
                self.trace.calls[path] = ModuleCall(
                    path, len(self.trace.calls), _shape(given), _shape(output),
                    next(module.parameters(), None) is not None,
                )  # fmt: skip

        return hook

    def _see(self, tensor: torch.Tensor) -> None:
        if id(tensor) not in self.depth:
            self.keep.append(tensor)
            self.depth[id(tensor)] = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ADDS and len(tensors) == 2:
            self._residual(*tensors)
        if name in TOKEN_ATTENTION and _over_tokens(name, tensors):
            self.trace.token_attention.append(self.stack[-1] if self.stack else "")
        depth = max((self.depth.get(id(t), 0) for t in tensors), default=0)
        output = func(*args, **(kwargs or {}))
        if name in MULS and len(tensors) == 2 and isinstance(output, torch.Tensor):
            self._gate(output, *tensors)
        for out in output if isinstance(output, tuple | list) else (output,):
            if isinstance(out, torch.Tensor):
                self._see(out)
                self.depth[id(out)] = max(self.depth[id(out)], depth + (name in LAYERS))
        return output

    def _residual(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dim() not in MAP_DIMS or a.shape != b.shape or a is b:
            return
        if id(a) not in self.depth or id(b) not in self.depth:  # a parameter or a constant
            return
        self.trace.adds.append(
            ResidualAdd(
                self.stack[-1] if self.stack else "",
                tuple(a.shape),
                (self.depth[id(a)], self.depth[id(b)]),
                (list(self.producers.get(id(a), [])), list(self.producers.get(id(b), []))),
            )
        )

    def _gate(self, output: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, g in ((a, b), (b, a)):
            maps = x.dim() in MAP_DIMS and g.dim() == x.dim() and x.shape[2:].numel() > 1
            if maps and g.shape[2:].numel() == 1 and g.shape[:2] == x.shape[:2]:
                self.gated[id(output)] = (id(x), int(x.shape[1]), x.dim() - 2)


def _over_tokens(name: str, tensors: list[torch.Tensor]) -> bool:
    """Whether a softmax is attention over tokens: of an N x N matrix of scores (ViT, Swin,
    MaxViT), not over a CNN's branches, groups or positions (SKNet, ResNeSt, GCNet)."""
    if "softmax" not in name:  # scaled-dot-product or multi-head attention itself
        return True
    scores = tensors[0] if tensors else None
    return scores is not None and scores.dim() >= 3 and scores.shape[-1] == scores.shape[-2] > 1


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None
