"""Load checkpoints into cbam models: the CBAM authors', torchvision's, and our own.

Every load is all-or-nothing: the checkpoint is checked against the model first (names,
shapes, nothing missing, nothing left over) and copied only when everything fits, so a
failed load leaves the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cbam.interop.errors import CheckpointError
from cbam.interop.identify import guess_model
from cbam.interop.official import convert_official, is_official, official_to_cbam_key
from cbam.interop.safe_load import Checkpoint, CheckpointSource, read_checkpoint
from cbam.layers import ATTENTION_LAYERS

SOURCES = ("auto", "official", "torchvision", "cbam")
_SHOWN = 8  # names listed per kind of problem


@dataclass(frozen=True)
class LoadReport:
    """What a load did: the format it read, how many tensors it copied, which of the model's
    tensors it left at their initial values, and the file's other top-level entries."""

    source: str
    origin: str
    loaded: int
    left_at_init: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(
    model: nn.Module, checkpoint: CheckpointSource, source: str = "auto"
) -> LoadReport:
    """Load a file or state dict into `model`, all or nothing.

    source: "official" (the CBAM authors' names, REFERENCE.md section 1), "torchvision" (a
    backbone without attention: every non-attention tensor must be there; attention stays at
    its init), "cbam" (our own names, strict), or "auto": official if the keys use the
    authors' CBAM names, torchvision if they hold none of the model's attention tensors,
    else cbam.
    """
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    ckpt = read_checkpoint(checkpoint)
    if source == "official" or (source == "auto" and is_official(ckpt.state_dict)):
        source = "official"
        ckpt = _to_cbam_names(ckpt)
    attention_keys = _attention_keys(model)
    if source == "auto":
        has_attention = any(k in ckpt.state_dict for k in attention_keys)
        source = "cbam" if has_attention or not attention_keys else "torchvision"
    may_be_missing: set[str] = set()
    if source == "torchvision":
        present = sorted(k for k in attention_keys if k in ckpt.state_dict)
        if present:
            raise CheckpointError(
                f"{ckpt.origin} holds attention tensors ({', '.join(present[:3])}, ...), so it "
                f"is not a backbone-only (torchvision) checkpoint; load it with source='cbam'"
            )
        may_be_missing = attention_keys
    _check_fits(model, ckpt, may_be_missing)
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    left = tuple(k for k in result.missing_keys if not k.endswith("num_batches_tracked"))
    if result.unexpected_keys or set(left) - may_be_missing:  # _check_fits rules this out
        raise RuntimeError(f"load_state_dict disagreed with the pre-check: {result}")
    return LoadReport(source, ckpt.origin, len(ckpt.state_dict), left, ckpt.metadata)


def load_official(model: nn.Module, checkpoint: CheckpointSource) -> LoadReport:
    """Load a checkpoint saved by the CBAM authors' training code (e.g. their ImageNet
    ResNet50+CBAM, `RESNET50_CBAM_new_name_wrap.pth`) into our ResNet+CBAM of the same depth,
    strictly: every tensor of the model and of the file must find its counterpart."""
    return load_checkpoint(model, checkpoint, source="official")


def load_torchvision(model: nn.Module, checkpoint: CheckpointSource) -> LoadReport:
    """Load a torchvision ResNet / ResNeXt / Wide-ResNet state dict (e.g.
    `torchvision.models.resnet50(weights=...).state_dict()`) into our model of the same
    architecture, for fine-tuning. Attention layers keep their initial values; every other
    tensor must be in the checkpoint with the right shape."""
    return load_checkpoint(model, checkpoint, source="torchvision")


def _to_cbam_names(ckpt: Checkpoint) -> Checkpoint:
    renamed = {official_to_cbam_key(k): ckpt.original(k) for k in ckpt.state_dict}
    converted = convert_official(ckpt.state_dict)
    names = {new: original for new, original in renamed.items() if new != original}
    return Checkpoint(converted, ckpt.origin, ckpt.metadata, names)


def is_attention_layer(module: nn.Module) -> bool:
    """Whether `module` is an attention layer (CBAM, SE, BAM, ..., any layer with a
    `placement`, or an identity-init wrapper): what a backbone-only checkpoint lacks."""
    from cbam.interop.identity_blend import IdentityBlend

    kinds = (*ATTENTION_LAYERS.values(), IdentityBlend)
    return isinstance(module, kinds) or getattr(type(module), "placement", None) in (
        "block",
        "stage",
    )


def _attention_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's attention layers, which a backbone-only checkpoint
    lacks."""
    prefixes = [f"{n}." for n, m in model.named_modules() if is_attention_layer(m)]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def _check_fits(model: nn.Module, ckpt: Checkpoint, may_be_missing: set[str]) -> None:
    expected = model.state_dict()
    given = ckpt.state_dict
    missing = [
        k for k in expected
        if k not in given and k not in may_be_missing and not k.endswith("num_batches_tracked")
    ]  # fmt: skip
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [
        k for k in given if k in expected and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {_names(ckpt.original(k) for k in unexpected)}"
        )
    if wrong_shape:
        shapes = [
            f"{_named(k, ckpt)}: model {list(expected[k].shape)}, checkpoint {list(given[k].shape)}"
            for k in wrong_shape
        ]
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_names(shapes, '; ', 4)}")
    hint = _hint(model, ckpt, missing, unexpected, wrong_shape)
    raise CheckpointError(
        f"checkpoint {ckpt.origin} ({len(given)} tensors) does not fit "
        f"{type(model).__name__} ({len(expected)} tensors):\n  "
        + "\n  ".join(problems)
        + (f"\n{hint}" if hint else "")
        + "\nNothing in the model was changed."
    )


def _hint(
    model: nn.Module, ckpt: Checkpoint, missing: list[str], unexpected: list[str],
    wrong_shape: list[str],
) -> str:  # fmt: skip
    if not missing and not unexpected and set(wrong_shape) <= {"fc.weight", "fc.bias"}:
        classes = ckpt.state_dict["fc.weight"].shape[0] if "fc.weight" in wrong_shape else "?"
        return (
            f"Only the classifier differs: build the model with num_classes={classes}, load, "
            f"then call model.reset_classifier(n) for a new head."
        )
    guess = guess_model(ckpt.state_dict)
    mine = guess_model(model.state_dict())
    if guess and guess != mine:
        return f"The checkpoint fits {guess}."
    return ""


def _named(key: str, ckpt: Checkpoint) -> str:
    original = ckpt.original(key)
    return key if original == key else f"{original} (-> {key})"


def _names(items: Iterable[str], separator: str = ", ", limit: int = _SHOWN) -> str:
    items = list(items)
    shown = separator.join(items[:limit])
    return shown + (f"{separator}... (+{len(items) - limit} more)" if len(items) > limit else "")
