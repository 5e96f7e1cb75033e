"""Faster R-CNN (torchvision's) over our ResNet + FPN backbones, as the paper's detection
experiment uses (REFERENCE.md section 5), with sizes that also fit small images."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from cbam._errors import unknown_choice
from cbam.detection.backbone import build_backbone
from cbam.interop.errors import CheckpointError
from cbam.interop.safe_load import CheckpointSource, read_checkpoint
from cbam.layers.create_attention import AttentionSpec

ROI_SIZE = 7  # RoIAlign output, as in torchvision's Faster R-CNN


def build_detector(
    backbone: str = "resnet50",
    attention: AttentionSpec = "cbam",
    num_classes: int = 91,
    *,
    attention_kwargs: Mapping[str, Any] | None = None,
    backbone_weights: CheckpointSource | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    representation_size: int = 1024,
    **faster_rcnn_kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN + FPN with one of our ResNets (+ CBAM, SE, or none) as its backbone.

    num_classes counts the background, as torchvision does (COCO: 91, VOC: 21).
    backbone_weights, trainable_layers, frozen_bn: see `build_backbone`.
    anchor_sizes: one size per FPN level (each stage, then the pooled extra level), in
        input pixels after the min_size/max_size resize; the defaults are torchvision's for
        COCO, small images want smaller ones (the small recipe: 16 ... 256 at 128 px).
    faster_rcnn_kwargs: passed on to torchvision's FasterRCNN (e.g. box_detections_per_img,
        rpn_batch_size_per_image, box_batch_size_per_image).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes counts the background too, so it must be at least 2, got {num_classes!r}"
        )
    body = build_backbone(
        backbone, attention, attention_kwargs=attention_kwargs, weights=backbone_weights,
        trainable_layers=trainable_layers, frozen_bn=frozen_bn, out_channels=fpn_channels,
    )  # fmt: skip
    levels = len(body.feature_names) + 1  # every stage, plus LastLevelMaxPool's extra level
    if len(anchor_sizes) != levels:
        raise ValueError(
            f"anchor_sizes needs one size per FPN level: {backbone} gives {levels} levels, "
            f"got {len(anchor_sizes)} sizes {list(anchor_sizes)}"
        )
    anchors = AnchorGenerator(
        tuple((int(size),) for size in anchor_sizes), (tuple(aspect_ratios),) * levels
    )
    roi_pool = MultiScaleRoIAlign(body.feature_names, output_size=ROI_SIZE, sampling_ratio=2)
    return FasterRCNN(
        body,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(fpn_channels * ROI_SIZE**2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **faster_rcnn_kwargs,
    )


# Detectors whose training targets need more than boxes, which cbam detect's data sets give.
NEEDS_MORE_THAN_BOXES = {"maskrcnn": "instance masks", "keypointrcnn": "keypoints"}
# Backbone-body key prefixes in an ImageNet classifier's state dict: ResNet bodies use the
# classifier's own names, MobileNet V3 bodies its `features`.
BODY_PREFIXES = ("", "features.")


def torchvision_detectors() -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models.detection)
    return [f"torchvision:{n}" for n in names]


def check_torchvision_detector(name: str) -> None:
    """`name` is a torchvision detector cbam detect can train (boxes only), or a clear error."""
    if name not in torchvision_detectors():
        raise unknown_choice("torchvision detector (model)", name, torchvision_detectors())
    arch = name.partition(":")[2]
    for prefix, needs in NEEDS_MORE_THAN_BOXES.items():
        if arch.startswith(prefix):
            raise ValueError(
                f"{name} trains on {needs} as well as boxes, and cbam detect's data sets give "
                f"boxes only; use a box detector (fasterrcnn_*, retinanet_*, fcos_*, ssd*), or "
                f"cbam.attach(model) in your own Mask/Keypoint R-CNN training loop"
            )


def build_torchvision_detector(
    name: str,
    attach: AttentionSpec | None = "cbam",
    num_classes: int = 91,
    *,
    detector_weights: CheckpointSource | None = None,
    backbone_weights: CheckpointSource | None = None,
    attention_kwargs: Mapping[str, Any] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
) -> nn.Module:
    """torchvision's detector `torchvision:NAME` for `num_classes`, from local weights only
    (nothing is downloaded): `detector_weights`, a file of the whole detector (any number of
    classes: the class-dependent tensors that do not fit stay at their init, reported), then
    `backbone_weights` (an ImageNet classifier's file) into its backbone body; then `attach`
    (identity init) in the body only: FPN, heads and transform stay torchvision's."""
    import torchvision

    from cbam.interop.attach import attach as attach_attention

    check_torchvision_detector(name)
    arch = name.partition(":")[2]
    sizes = {} if arch.startswith("ssd") else {"min_size": min_size, "max_size": max_size}
    model = torchvision.models.get_model(
        arch, weights=None, weights_backbone=None, num_classes=num_classes, **sizes
    )
    if detector_weights is not None:
        _load_fitting(model, detector_weights, name)
    if backbone_weights is not None:
        _load_body(model, backbone_weights, name)
    if attach is not None:
        attach_attention(model, attach, identity_init=True, **dict(attention_kwargs or {}))
    return model


def _load_fitting(model: nn.Module, source: CheckpointSource, name: str) -> None:
    """A whole detector's weights, strictly by name; tensors whose shape differs (the class
    scores and box regressions of another class count) keep their init, with a warning."""
    state = read_checkpoint(source).state_dict
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or missing:
        raise CheckpointError(
            f"{source} is not a {name} checkpoint: {len(missing)} of its tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    resized = [k for k in own if state[k].shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
    if resized:
        warnings.warn(
            f"{source}: {len(resized)} tensors of another class count left at their init "
            f"({', '.join(resized[:4])}{', ...' if len(resized) > 4 else ''})",
            stacklevel=3,
        )


def _load_body(model: nn.Module, source: CheckpointSource, name: str) -> None:
    """An ImageNet classifier's weights into the detector's backbone body (its head unused)."""
    from cbam.interop.attach import backbone_body

    path, body = backbone_body(model)
    state = read_checkpoint(source).state_dict
    keys = list(body.state_dict())
    for prefix in BODY_PREFIXES:
        if all(prefix + k in state for k in keys):
            body.load_state_dict({k: state[prefix + k] for k in keys})
            return
    raise CheckpointError(
        f"{source} does not hold {name}'s backbone body ({path}): its tensor "
        f"{keys[0]!r} is in the file neither as is nor as 'features.{keys[0]}'"
    )
