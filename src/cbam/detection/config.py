"""Detection run configuration: a recipe plus overrides, validated up front, saved with the run.

Recipes are Python mappings (no package data needed): `small` trains on the embedded
synthetic set on a CPU in minutes; `coco` and `voc` follow the usual Faster R-CNN + FPN
schedules (lr 0.02 per 16 images, warm-up, decay at fixed epochs) for a GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cbam._device import resolve_device
from cbam._errors import unknown_choice
from cbam._paths import check_output_folder
from cbam.detection.backbone import resnet_backbones
from cbam.training.config import check_step_epochs, merge, read_yaml

DETECTION_DATASETS = ("synthetic", "coco", "voc")

# ResNet-50 + FPN at COCO's usual scale, 1x schedule (12 epochs, decay at 8 and 11), backbone
# from ImageNet weights (--backbone-weights) with frozen BN and the stem and layer1 frozen.
COCO_RECIPE: dict[str, Any] = {
    "backbone": "resnet50",
    "dataset": "coco",
    "train_split": "train2017",
    "test_split": "val2017",
    "min_size": 800,
    "max_size": 1333,
    "anchor_sizes": [32, 64, 128, 256, 512],
    "fpn_channels": 256,
    "representation_size": 1024,
    "rpn_batch_size_per_image": 256,
    "box_batch_size_per_image": 512,
    "rpn_proposals_train": 2000,
    "rpn_proposals_test": 1000,
    "epochs": 12,
    "batch_size": 16,
    "lr": 0.02,
    "base_batch_size": 16,
    "weight_decay": 1e-4,
    "schedule": "step",
    "step_epochs": [8, 11],
    "warmup_epochs": 0.1,
}
# VOC 2007 trainval -> test at 600-1000 px, 12 epochs with one decay at 9.
VOC_RECIPE: dict[str, Any] = {
    **COCO_RECIPE,
    "dataset": "voc",
    "train_split": "trainval",
    "test_split": "test",
    "min_size": 600,
    "max_size": 1000,
    "lr": 0.01,
    "step_epochs": [9],
    "warmup_epochs": 0.3,
}
RECIPES: dict[str, dict[str, Any]] = {"small": {}, "coco": COCO_RECIPE, "voc": VOC_RECIPE}


@dataclass
class DetectConfig:
    """Everything that defines a detection run; saved as config.yaml in the run folder.

    The defaults are the `small` recipe: ResNet-18 + FPN on 128 px synthetic canvases."""

    # model: Faster R-CNN + FPN over our `backbone` with `attention`, or (`model`) one of
    # torchvision's detectors as torchvision builds it, `attach` inserted in its backbone body
    # with identity init, after `detector_weights` (a local file of the whole detector) and
    # `backbone_weights` are loaded
    model: str | None = None  # torchvision:NAME (cbam.detection.torchvision_detectors())
    attach: str | None = None
    detector_weights: str | None = None
    backbone: str = "resnet18"
    attention: str | None = "cbam"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None  # ImageNet-style weights: ours, torchvision's, authors'
    trainable_layers: int | None = None  # None: 3 with backbone_weights, all (5) without
    frozen_bn: bool | None = None  # None: frozen with backbone_weights, trained without
    min_size: int = 128  # GeneralizedRCNNTransform resizes the shorter side to this...
    max_size: int = 128  # ...and the longer side to at most this
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    fpn_channels: int = 128
    representation_size: int = 256  # the box head's two fully connected layers
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 128
    rpn_proposals_train: int = 600  # RPN proposals kept before and after NMS (torchvision:
    rpn_proposals_test: int = 300  # 2000 / 1000 for COCO; a few objects per image need fewer)
    # data
    dataset: str = "synthetic"
    data_dir: str | None = None
    train_split: str | None = None  # None: train2017 (coco), trainval (voc), train (synthetic)
    test_split: str | None = None  # None: val2017 (coco), test (voc), test (synthetic)
    voc_year: str = "2007"
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticSpec overrides
    train_subset: int | None = None
    test_subset: int | None = None
    flip: bool = True
    strict: bool = False
    workers: int = 0
    # optimisation
    epochs: int = 6
    batch_size: int = 8
    lr: float = 0.02  # for base_batch_size images per step; scaled linearly with the batch
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    step_epochs: int | list[int] = 30
    step_gamma: float = 0.1
    warmup_epochs: float = 0.5
    # execution
    seed: int = 0
    device: str = "auto"
    amp: str | None = None  # None | "bf16" | "fp16"
    flush_denormal: bool = True
    output: str = "runs/detect"
    log_every: int = 10

    @property
    def description(self) -> str:
        """The detector in a few words, for logs."""
        if self.model is not None:
            return self.model + (f" + {self.attach} (attached)" if self.attach else "")
        return f"Faster R-CNN + FPN on {self.backbone} + {self.attention or 'no attention'}"

    @property
    def scaled_lr(self) -> float:
        """lr x batch / base batch (the linear scaling rule)."""
        return self.lr * self.batch_size / self.base_batch_size

    def validate(self) -> DetectConfig:
        checks = {
            "dataset": (self.dataset, DETECTION_DATASETS),
            "schedule": (self.schedule, ("cosine", "step", "constant")),
            "amp": (self.amp, (None, "bf16", "fp16")),
        }
        for name, (value, choices) in checks.items():
            if value not in choices:
                raise unknown_choice(name, value, [str(c) for c in choices])
        if self.model is not None:
            from cbam.detection.model import check_torchvision_detector

            check_torchvision_detector(self.model)
        elif self.attach is not None or self.detector_weights is not None:
            raise ValueError(
                "attach and detector_weights are for model: torchvision:NAME (one of "
                "torchvision's detectors); our Faster R-CNN takes attention= and "
                "backbone_weights="
            )
        if self.backbone not in resnet_backbones():
            raise unknown_choice("detection backbone", self.backbone, resnet_backbones())
        positive = (
            "epochs", "batch_size", "base_batch_size", "log_every", "min_size", "max_size",
            "fpn_channels", "representation_size", "rpn_batch_size_per_image",
            "box_batch_size_per_image", "rpn_proposals_train", "rpn_proposals_test",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
        if not self.anchor_sizes or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.anchor_sizes
        ):
            raise ValueError(
                f"anchor_sizes must be a list of positive integers, one per FPN level "
                f"(e.g. [32, 64, 128, 256, 512]), got {self.anchor_sizes!r}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_step_epochs(self.step_epochs)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        resolve_device(self.device)
        check_output_folder(self.output, "output")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_detect_config(
    recipe: str | os.PathLike[str] | None = "small",
    overrides: dict[str, Any] | None = None,
) -> DetectConfig:
    """Defaults <- recipe (small, coco, voc, or a YAML path) <- overrides, validated."""
    config = DetectConfig()
    if recipe is not None:
        if str(recipe) in RECIPES:
            config = merge(config, RECIPES[str(recipe)], f"recipe {recipe}")
        else:
            config = merge(config, read_yaml(Path(recipe), list(RECIPES)), str(recipe))
    if overrides:
        config = merge(config, overrides, "overrides")
    return config.validate()
