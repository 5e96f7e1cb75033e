"""Which registered model a state dict belongs to, for "did you mean" hints in load errors.

Each registered model is built on the meta device (no memory, no init cost) and its key
names and shapes compared with the checkpoint's. It runs only when a load has already
failed, and takes well under a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from cbam.models import create_model, list_models, model_entry
from cbam.models.resnet import ResNet

Shapes = dict[str, tuple[int, ...]]

# Paper configurations tried besides each model's defaults.
_EXTRA_KWARGS: dict[str, tuple[dict[str, Any], ...]] = {
    "wide_resnet18": ({"widen": 2.0},),
    "mobilenet_v1": ({"width_mult": 0.7},),
}
_ATTENTIONS = ("cbam", "se", "bam", "channel", "spatial")


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """A `create_model(...)` call whose model has exactly these keys and shapes (or, failing
    that, the same backbone), e.g. "create_model('resnet18', attention='cbam')"; None if no
    registered model fits."""
    given = _shapes({k: tuple(v.shape) for k, v in state_dict.items()})
    num_classes = given["fc.weight"][0] if "fc.weight" in given else 0
    stem = given.get("conv1.weight") or given.get("stem.0.weight")
    in_chans = stem[1] if stem and len(stem) == 4 else 3
    best: tuple[int, str, tuple[tuple[str, Any], ...]] | None = None
    for name in list_models():
        for kwargs in ({}, *_EXTRA_KWARGS.get(name, ())):
            if model_entry(name).model_class is ResNet and stem and len(stem) == 4:
                kwargs = {**kwargs, "small_input": stem[-1] == 3}
            key = tuple(sorted(kwargs.items()))
            plain = _model_shapes(name, None, num_classes, in_chans, key)
            fits = plain and all(given.get(k) == shape for k, shape in plain.items())
            if fits and (best is None or len(plain) > best[0]):
                best = (len(plain), name, key)
    if best is None:
        return None
    _, name, key = best
    extras = dict(key)
    if num_classes != model_entry(name).num_classes:
        extras["num_classes"] = num_classes
    if in_chans != 3:
        extras["in_chans"] = in_chans
    if extras.get("small_input") is (model_entry(name).input_size != 224):
        del extras["small_input"]  # the model's default
    for attention in (None, *_ATTENTIONS):
        if _model_shapes(name, attention, num_classes, in_chans, key) == given:
            return _call(name, attention, extras)
    return _call(name, None, extras) + " (its backbone; the attention layers match none of ours)"


def _call(name: str, attention: str | None, extras: dict[str, Any]) -> str:
    args = [repr(name)] + ([f"attention={attention!r}"] if attention else [])
    args += [f"{k}={v!r}" for k, v in extras.items()]
    return f"create_model({', '.join(args)})"


def _shapes(shapes: Mapping[str, tuple[int, ...]]) -> Shapes:
    # BatchNorm counters are absent from old checkpoints and carry no weights: ignore them.
    return {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked")}


@lru_cache(maxsize=256)
def _model_shapes(
    name: str,
    attention: str | None,
    num_classes: int,
    in_chans: int,
    kwargs: tuple[tuple[str, Any], ...],
) -> Shapes | None:
    try:
        with torch.device("meta"):
            model = create_model(
                name, attention=attention, num_classes=num_classes, in_chans=in_chans,
                **dict(kwargs),
            )  # fmt: skip
    except (ValueError, TypeError):
        return None
    return _shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})
