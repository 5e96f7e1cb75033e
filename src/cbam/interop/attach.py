"""`attach`: insert attention into an existing CNN (torchvision, timm, cbam), keeping its weights.

Where it goes comes from the network's structure (`placements`, read from one recorded
forward pass, `trace`), not from a table of classes: the paper's place on every residual
branch before the add, in place of the network's own SE layers, or once per stage. ResNet
blocks with a named slot use it (`resnet_slots`). Detection and segmentation models get
attention in their backbone body only: FPN, ASPP and heads are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cbam._errors import unknown_choice
from cbam.interop import placements as place
from cbam.interop.attached import Attached, Swapped, unwrap
from cbam.interop.identity_blend import IdentityBlend
from cbam.interop.resnet_slots import SUPPORTED as SLOT_FAMILIES
from cbam.interop.resnet_slots import Slot, find_slots
from cbam.interop.trace import MAP_DIMS, Trace, trace_model
from cbam.layers import CBAM
from cbam.layers.create_attention import AttentionSpec
from cbam.models._common import attention_builders

SUPPORTED = (
    "any CNN whose forward pass yields N x C x H x W feature maps (or N x C x L, 1-D; "
    "N x C x D x H x W, 3-D): torchvision's and timm's ResNet, ResNeXt, Wide ResNet, RegNet, "
    "MobileNet V2/V3, EfficientNet (V2), MNASNet, ShuffleNet V2, ConvNeXt, GoogLeNet, "
    "Inception v3, DenseNet, SqueezeNet, VGG, AlexNet; torchvision's video ResNets and S3D",
    *SLOT_FAMILIES,
)
OUT_OF_SCOPE = "transformers (ViT, Swin, MaxViT, DeiT, ...)"
FROZEN = (
    "frozen layers (no parameter requires grad): unfreeze them first (requires_grad_(True); "
    "torchvision's detectors: trainable_backbone_layers=5) to attend there"
)
# A model with one of these and no `backbone` is a detector attach cannot find the body of.
DETECTOR_PARTS = ("roi_heads", "rpn", "anchor_generator")
# Tried in turn: Inception v3 needs more than 64 px, SSD300 more than 224.
TRACE_SIZES = (64, 128, 224, 320)
# The spatial sizes of a traced input for each size, by the first conv's dimensionality:
# 1-D nets (signals, audio) downsample long sequences; video nets take 16 frames.
TRACE_SHAPES = {
    1: lambda size: (size * 16,),
    2: lambda size: (size, size),
    3: lambda size: (16, size, size),
}
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Plan:
    """What `attach` will do (or did): the sites, what was skipped, how."""

    sites: list[place.Site]
    skipped: list[place.Skipped] = field(default_factory=list)
    placement: str = "residual"
    body: str = ""  # the backbone body's path in a detection / segmentation model
    slots: list[Slot] = field(default_factory=list)  # ResNet blocks with a named slot


def attach(
    model: nn.Module,
    attention: AttentionSpec = "cbam",
    *,
    identity_init: bool = False,
    replace: bool = False,
    placement: str = "auto",
    example_input: torch.Tensor | None = None,
    report: bool = False,
    **attention_kwargs: Any,
) -> nn.Module:
    """Add `attention` to `model` (in place) and return the model.

    placement: "residual" (the paper's: on every residual branch, before the add),
    "replace-se" (in place of the network's SE layers), "stage" (once per stage output), or
    "auto": residual where the network has residual adds, else stage.

    The pretrained weights stay where they are, under their own names. With the default
    `identity_init=False` each site gets the paper's module with the paper's init, which
    scales the feature map by roughly 0.25 at first, so the network must be fine-tuned.
    `identity_init=True` blends each layer with the identity (x + alpha * (attention(x) -
    x), alpha = 0 at first; with replace-se, SE(x) + alpha * (CBAM(x) - SE(x))), so the
    outputs are exactly the original network's until training moves alpha.
    An attached model (or one with SE layers in ResNet slots) raises unless `replace=True`,
    which removes what was attached before. `example_input` is the batch the structure is
    read from (default: 1 x C x 64 x 64 zeros). `report=True` prints where attention went,
    the parameters and MACs (224 px) it added and what was skipped (`cbam.attach_report`
    returns the same as data). Keyword arguments go to the attention layer (e.g.
    kernel_size=3).
    """
    if report:
        from cbam.interop.report import attach_report, format_report

        found = attach_report(
            model, attention, placement, identity_init=identity_init, replace=replace,
            example_input=example_input, in_place=True, **attention_kwargs,
        )  # fmt: skip
        print(format_report(found))
        return model
    build = layer_builder(attention, attention_kwargs)
    plan = plan_attach(model, placement, replace=replace, example_input=example_input)
    return apply_plan(model, plan, build, attention, identity_init=identity_init, replace=replace)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    build: Callable[[int], nn.Module],
    attention: AttentionSpec,
    *,
    identity_init: bool = False,
    replace: bool = False,
) -> nn.Module:
    """Insert `build(channels)` (`attention`'s layers) at each site of `plan`, which
    `plan_attach` made for this very model; returns the model."""
    if plan.slots:
        _fill_slots(plan, build, identity_init, replace, attention)
        return model
    body = model.get_submodule(plan.body)
    if replace:
        _remove_attached(body)
    layers = [_layer(build, site, identity_init) for site in plan.sites]  # may raise first
    # Deepest first, so that a wrapped module's path still leads to the ones inside it.
    for site, layer in sorted(zip(plan.sites, layers, strict=True), key=_depth, reverse=True):
        _insert(body, site, layer, identity_init)
    return model


def plan_attach(
    model: nn.Module,
    placement: str = "auto",
    *,
    replace: bool = False,
    example_input: torch.Tensor | None = None,
) -> Plan:
    """The sites `attach` would use, without changing the model; raises for models it cannot
    take (no feature maps, a transformer, attached already, an unknown placement)."""
    if placement not in place.PLACEMENTS:
        raise unknown_choice("placement", placement, place.PLACEMENTS)
    body_path, body = backbone_body(model)
    if placement in ("auto", "residual"):
        slots = find_slots(body)
        if slots:
            sites = [place.Site(s.name, s.channels, "residual", "ResNet slot") for s in slots]
            return _without_frozen(
                Plan(sites, placement="residual", body=body_path, slots=slots), body
            )
    attached = [n for n, m in body.named_modules() if isinstance(m, Attached | Swapped)]
    if attached and not replace:
        raise ValueError(
            f"{type(model).__name__} already has attention attached at {len(attached)} "
            f"site(s) ({', '.join(attached[:3])}{', ...' if len(attached) > 3 else ''}); "
            f"pass replace=True to remove it and attach again"
        )
    built_in = [n for n, m in body.named_modules() if isinstance(m, CBAM | IdentityBlend)]
    built_in = [n for n in built_in if not any(n.startswith(a + ".") for a in attached)]
    if built_in:
        raise ValueError(
            f"{type(model).__name__} was built with attention ({built_in[0]}, ...); build it "
            f"with attention=None to attach instead"
        )
    # Sites are paths in the plain network (what was attached before is removed first):
    # traced, and checked for frozen layers, there.
    plain = _plain_copy(body) if attached else body
    trace = _trace(plain, example_input, model)
    return _without_frozen(
        _plan_from_trace(trace, placement, body_path, type(model).__name__), plain
    )


def backbone_body(model: nn.Module) -> tuple[str, nn.Module]:
    """A detection or segmentation model's backbone body (torchvision: `backbone.body` or
    `backbone`), where attention goes; any other model is its own body."""
    backbone = getattr(model, "backbone", None)
    parts = detector_parts(model)
    if parts and not isinstance(backbone, nn.Module):
        raise ValueError(
            f"{type(model).__name__} looks like a detector ({parts[0]}) but has no "
            f"`backbone` module, and attach puts attention in a detector's backbone only; "
            f"attach to the feature extractor itself (attach(model.<extractor>, ...))"
        )
    if not isinstance(backbone, nn.Module) or not _has_head(model):
        return "", model
    body = getattr(backbone, "body", None)
    if isinstance(body, nn.Module):
        return "backbone.body", body
    return "backbone", backbone


def detector_parts(model: nn.Module) -> list[str]:
    """The parts that make `model` a detector (roi_heads, rpn, anchor_generator), if any."""
    return [p for p in DETECTOR_PARTS if isinstance(getattr(model, p, None), nn.Module)]


def _without_frozen(plan: Plan, body: nn.Module) -> Plan:
    """The plan less its sites in frozen layers, each reported. Attention there would train
    only by running backward through layers the user froze to save exactly that (torchvision's
    detectors freeze the stem and layer1 when fine-tuning), so it is left out instead."""
    frozen = [site.path for site in plan.sites if _frozen(body, site.path)]
    if not frozen:
        return plan
    if len(frozen) == len(plan.sites):
        raise ValueError(
            f"every place for attention ({len(frozen)}, e.g. {frozen[0]}) is in {FROZEN}"
        )
    plan.skipped += [place.Skipped(path, f"in {FROZEN}") for path in frozen]
    plan.sites = [site for site in plan.sites if site.path not in frozen]
    plan.slots = [slot for slot in plan.slots if slot.name not in frozen]
    return plan


def _frozen(body: nn.Module, path: str) -> bool:
    """Whether the nearest module at or above `path` that has parameters has none that train
    (a FrozenBatchNorm2d has none: its block decides)."""
    parts = path.split(".") if path else []
    for end in range(len(parts), -1, -1):
        parameters = list(body.get_submodule(".".join(parts[:end])).parameters())
        if parameters:
            return not any(p.requires_grad for p in parameters)
    return False


def _has_head(model: nn.Module) -> bool:
    heads = ("roi_heads", "head", "classifier", "rpn")
    return any(isinstance(getattr(model, h, None), nn.Module) for h in heads)


def _plan_from_trace(trace: Trace, placement: str, body: str, name: str) -> Plan:
    if trace.token_attention:
        raise ValueError(
            f"{name} attends over tokens (softmax in {trace.token_attention[0] or 'forward'}): "
            f"attach takes convolutional networks; {OUT_OF_SCOPE} are out of scope"
        )
    if not any(c.output_shape and len(c.output_shape) in MAP_DIMS for c in trace.calls.values()):
        raise ValueError(
            f"{name} has no convolutional feature maps (no module returns an N x C x H x W, "
            f"N x C x L or N x C x D x H x W tensor), so there is nowhere to put CBAM. attach "
            f"takes: {'; '.join(SUPPORTED)}"
        )
    skipped: list[place.Skipped] = []
    if placement in ("auto", "residual"):
        sites, skipped = place.residual_sites(trace)
        if not sites and placement == "residual":
            raise ValueError(
                f"{name} has no residual adds of feature maps; use placement='stage' (once "
                f"per stage output) or 'auto'"
            )
        if not sites:
            skipped.append(place.Skipped("", "no residual adds: placement 'stage' instead"))
            placement, sites = "stage", place.stage_sites(trace)
        else:
            placement = "residual"
    elif placement == "replace-se":
        sites = place.se_sites(trace)
        if not sites:
            raise ValueError(
                f"{name} has no SE layers (modules that scale their input by an N x C x 1 x 1 "
                f"gate); use placement='residual' or 'stage'"
            )
    else:
        sites = place.stage_sites(trace)
    usable = []
    for site in sites:
        count = trace.calls[site.path].count
        if count > 1:
            skipped.append(place.Skipped(site.path, f"called {count} times in one pass"))
        else:
            usable.append(site)
    if not usable:
        raise ValueError(f"attach found no site for placement {placement!r} in {name}")
    return Plan(usable, skipped, placement, body)


def _trace(body: nn.Module, example: torch.Tensor | None, model: nn.Module) -> Trace:
    if example is not None:
        try:
            return trace_model(body, example)
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:
            raise ValueError(
                f"attach could not run {type(model).__name__} on example_input of shape "
                f"{tuple(example.shape)}: {error}. Pass a batch the model takes (N x C x ...)"
            ) from None
    conv = next((m for m in body.modules() if isinstance(m, CONVS)), None)
    dims = 2 if conv is None else len(conv.kernel_size)
    weight = next(body.parameters(), None)
    # The first conv's input channels, else RGB: a space-to-depth stem (TResNet) takes 3
    # channels although its first conv takes 48.
    channels = list(dict.fromkeys([conv.in_channels if conv is not None else 3, 3]))
    error: Exception | None = None
    for size in TRACE_SIZES:
        for in_chans in channels:
            x = torch.zeros(1, in_chans, *TRACE_SHAPES[dims](size))
            if weight is not None:
                x = x.to(device=weight.device, dtype=weight.dtype)
            try:
                return trace_model(body, x)
            except (RuntimeError, ValueError, AssertionError, IndexError) as caught:
                error = caught
    shapes = ", ".join(" x ".join(map(str, TRACE_SHAPES[dims](s))) for s in TRACE_SIZES)
    raise ValueError(
        f"attach could not run {type(model).__name__} on a 1 x {channels[0]} x ... input "
        f"({shapes}): {error}. Pass example_input= a batch the model takes; "
        f"attach takes convolutional image models, {OUT_OF_SCOPE} are out of scope"
    )


def layer_builder(attention: AttentionSpec, kwargs: dict[str, Any]) -> Callable[[int], nn.Module]:
    """The layer for C channels; below C = reduction (16), reduction becomes C (one hidden
    unit), as MobileNets' and GhostNets' 8- and 12-channel stages need."""
    build = _checked_builder(attention, kwargs)
    if "reduction" in kwargs:
        return build

    def narrow_enough(channels: int, **site: Any) -> nn.Module:
        try:
            return build(channels, **site)
        except ValueError as error:
            if "reduction" not in str(error):
                raise
            return _checked_builder(attention, {**kwargs, "reduction": channels})(channels, **site)

    return narrow_enough


def _checked_builder(
    attention: AttentionSpec, kwargs: dict[str, Any]
) -> Callable[[int], nn.Module]:
    build, stage_build = attention_builders(attention, kwargs)
    if build is None:
        if stage_build is not None:
            raise ValueError(
                "attach puts attention inside residual blocks, but this attention (BAM) goes "
                "between stages; use 'cbam', 'se', 'channel', 'spatial' or a callable"
            )
        raise ValueError("attention=None attaches nothing; pick e.g. attention='cbam'")
    return build


def _fill_slots(
    plan: Plan, build: Callable[[int], nn.Module], identity_init: bool, replace: bool, name: Any
) -> None:
    taken = [s for s in plan.slots if s.existing is not None]
    if taken and not replace:
        kind = type(taken[0].existing).__name__
        names = ", ".join(s.name for s in taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise ValueError(
            f"{len(taken)} block(s) already have attention ({kind} in {names}); pass "
            f"replace=True to swap it for {name!r} (its weights are dropped)"
        )
    layers = [_layer(build, site, identity_init) for site in plan.sites]
    for slot, layer in zip(plan.slots, layers, strict=True):
        slot.fill(_placed(layer, slot.block))


def _layer(build: Callable[..., nn.Module], site: place.Site, identity_init: bool) -> nn.Module:
    if site.spatial_dims == 2:
        layer = build(site.channels)
    else:  # a 1-D or 3-D network: the layer of its dimensionality
        try:
            layer = build(site.channels, spatial_dims=site.spatial_dims)
        except TypeError as error:
            if "spatial_dims" not in str(error):
                raise
            raise ValueError(
                f"{site.path} outputs a {site.spatial_dims}-D feature map, so the attention "
                f"must take spatial_dims={site.spatial_dims} as cbam's layers do; this callable "
                f"does not ({error})"
            ) from None
    if identity_init and site.placement != "replace-se":
        layer = IdentityBlend(layer)
    return layer


def _insert(body: nn.Module, site: place.Site, layer: nn.Module, identity_init: bool) -> None:
    parent_path, _, name = site.path.rpartition(".")
    parent = body.get_submodule(parent_path)
    module = getattr(parent, name)
    if site.placement == "replace-se" and not identity_init:
        setattr(parent, name, _placed(layer, module, body))
        return
    wrapper = (Swapped if site.placement == "replace-se" else Attached)(module, layer)
    wrapper.attention = _placed(wrapper.attention, module, body)  # with Swapped's alpha
    wrapper.training = module.training  # not .train(): the wrapped module keeps its modes
    setattr(parent, name, wrapper)


def _placed(layer: nn.Module, near: nn.Module, fallback: nn.Module | None = None) -> nn.Module:
    """`layer` on the device and in the dtype and mode of the module it goes next to."""
    like = next(near.parameters(), None)
    if like is None and fallback is not None:
        like = next(fallback.parameters(), None)
    if like is not None:
        layer = layer.to(device=like.device, dtype=like.dtype)
    return layer.train(near.training)


def _remove_attached(body: nn.Module) -> None:
    for path, module in sorted(body.named_modules(), key=lambda item: -item[0].count(".")):
        if isinstance(module, Attached | Swapped):
            parent_path, _, name = path.rpartition(".")
            setattr(body.get_submodule(parent_path), name, unwrap(module))


def _plain_copy(body: nn.Module) -> nn.Module:
    import copy

    plain = copy.deepcopy(body)
    _remove_attached(plain)
    return plain


def _depth(item: tuple[place.Site, nn.Module]) -> int:
    return item[0].path.count(".")
