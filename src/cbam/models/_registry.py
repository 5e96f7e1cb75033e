"""Model registry: `create_model("resnet50", attention="cbam")` and `list_models()`."""

from __future__ import annotations

import fnmatch
import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from cbam._errors import unknown_choice, unknown_kwargs
from cbam.layers.create_attention import AttentionSpec


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, and the input size and head its paper uses."""

    name: str
    builder: Callable[..., nn.Module]
    model_class: type[nn.Module]
    input_size: int
    num_classes: int

    def accepted_kwargs(self) -> list[str]:
        fixed = {"self", "block", "layers", "widths", "stem_width", "groups", "width_per_group"}
        names = set(inspect.signature(self.model_class.__init__).parameters) - fixed
        for name, p in inspect.signature(self.builder).parameters.items():
            if p.kind is not inspect.Parameter.VAR_KEYWORD:
                names.add(name)
        return sorted(names)


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    model_class: type[nn.Module], input_size: int = 224, num_classes: int = 1000
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        _MODELS[name] = ModelEntry(name, builder, model_class, input_size, num_classes)
        return builder

    return register


def _natural_key(name: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (e.g. "resnet*"), in natural
    order (resnet18 before resnet101)."""
    names = [name for name in _MODELS if fnmatch.fnmatch(name, pattern)]
    return sorted(names, key=_natural_key)


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise unknown_choice("model", name, list_models())
    return _MODELS[name]


def create_model(
    name: str,
    attention: AttentionSpec = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    attention_kwargs: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a registered backbone, optionally with attention ("se", "bam", "cbam").

    `attention_kwargs` go to the attention layer (e.g. {"kernel_size": 3}); `model_kwargs`
    to the model (e.g. small_input=True, widen=2.0, width_mult=0.7). `checkpoint` (a .pth,
    .pth.tar or .safetensors file, or a state dict) is loaded all or nothing: the CBAM
    authors' format, torchvision's (attention then stays at its init) or ours, see
    `cbam.load_checkpoint`.
    """
    entry = model_entry(name)
    error = unknown_kwargs(name, model_kwargs, entry.accepted_kwargs())
    if error is not None:
        raise error
    model = entry.builder(
        attention=attention,
        attention_kwargs=attention_kwargs,
        num_classes=num_classes,
        in_chans=in_chans,
        **model_kwargs,
    )
    if checkpoint is not None:
        # Imported here: models must not import interop (imports go layers <- models <- interop).
        from cbam.interop.checkpoints import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model
