"""torchvision transforms v2 pipelines for the two recipes."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def small_image_transforms(
    size: int, resize: bool, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[v2.Transform, v2.Transform]:
    """Train: pad-4 random crop + horizontal flip (the CIFAR ResNet recipe); test: as is.

    With `resize`, images of any size and shape first have their shorter side resized to
    `size` (and the test images are center-cropped), so every sample is size x size.
    """
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    scale = [v2.Resize(size, antialias=True)] if resize else []
    crop = [v2.CenterCrop(size)] if resize else []
    train = v2.Compose(
        [*scale, v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(), *to_tensor]
    )
    return train, v2.Compose([*scale, *crop, *to_tensor])


def imagenet_transforms(
    size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[v2.Transform, v2.Transform]:
    """The authors' ImageNet pipeline: RandomResizedCrop + flip; test resize 256/224 + crop."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose(
        [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor]
    )
    test = v2.Compose(
        [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size), *to_tensor]
    )
    return train, test
