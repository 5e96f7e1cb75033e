"""Faster R-CNN (torchvision's) over our ResNet + FPN backbones, as the paper's detection
experiment uses (REFERENCE.md section 5), with sizes that also fit small images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from cbam.detection.backbone import build_backbone
from cbam.interop.safe_load import CheckpointSource
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


def build_torchvision_detector(
    name: str,
    attention: AttentionSpec = "cbam",
    num_classes: int = 91,
    *,
    attention_kwargs: Mapping[str, Any] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's detector `torchvision:NAME` (fasterrcnn_*, retinanet_*, fcos_*,
    maskrcnn_*, keypointrcnn_*, ssd*), random weights, with `attention` attached with identity
    init in its backbone body only: FPN and heads stay torchvision's."""
    import torchvision

    from cbam.interop.attach import attach

    arch = name.partition(":")[2]
    model = torchvision.models.get_model(
        arch, weights=None, weights_backbone=None, num_classes=num_classes,
        min_size=min_size, max_size=max_size, **kwargs,
    )  # fmt: skip
    if attention is not None:
        attach(model, attention, identity_init=True, **dict(attention_kwargs or {}))
    return model


def torchvision_detectors() -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models.detection)
    return [f"torchvision:{n}" for n in names]
