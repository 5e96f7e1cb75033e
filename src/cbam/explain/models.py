"""The models to compare, each with what it needs to turn an image into its input tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from cbam.data import DataSplits
from cbam.explain.images import Sample


@dataclass
class ExplainModel:
    """A classifier plus its preprocessing: a model trained by `cbam train`
    (`load_models`) or any N x C x H x W classifier of your own.

    `transform` maps a PIL image of `image_size` x `image_size` to the normalised tensor the
    model was trained on; `resize` fits other sizes first (shorter side, then a centre crop)
    for recipes whose test transform does not (the small-image recipe).
    """

    name: str
    model: nn.Module
    classes: list[str]
    transform: Callable[[Image.Image], torch.Tensor]
    in_chans: int
    image_size: int
    resize: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    splits: DataSplits | None = None  # the data it was trained on, when known

    def fit(self, image: Image.Image) -> Image.Image:
        """The image in the model's colour mode and (with `resize`) its input size."""
        image = image.convert("L" if self.in_chans == 1 else "RGB")
        if self.resize and image.size != (self.image_size, self.image_size):
            image = v2.CenterCrop(self.image_size)(v2.Resize(self.image_size)(image))
        return image

    def inputs(self, samples: Sequence[Sample]) -> torch.Tensor:
        """The batch the model sees for `samples`, on its device."""
        return torch.stack([self.transform(self.fit(s.image)) for s in samples]).to(self.device)

    def display(self, samples: Sequence[Sample]) -> torch.Tensor:
        """N x H x W x 3 floats in [0, 1]: the model's input with normalisation undone, grey
        repeated to RGB, so overlays line up pixel for pixel with what the model saw."""
        x = self.inputs(samples).detach().float().cpu()
        mean, std = normalisation(self.transform, x.shape[1])
        x = (x * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            x = x[:, :3] if x.shape[1] > 3 else x[:, :1].expand(-1, 3, -1, -1)
        return x.permute(0, 2, 3, 1).contiguous()


def normalisation(transform: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the last Normalize in a (v1 or v2) Compose; zeros/ones when none."""
    mean, std = torch.zeros(channels), torch.ones(channels)
    for t in getattr(transform, "transforms", [transform]):
        if hasattr(t, "mean") and hasattr(t, "std"):
            mean = torch.as_tensor(t.mean, dtype=torch.float32).expand(channels)
            std = torch.as_tensor(t.std, dtype=torch.float32).expand(channels)
    return mean, std


def default_name(config: Any) -> str:
    """'resnet20', 'resnet20+se', 'resnet20+cbam': the model and its attention."""
    attention = config.attention
    return config.model if attention in (None, "none") else f"{config.model}+{attention}"


def load_models(
    sources: Sequence[str | Path],
    names: Sequence[str] | None = None,
    weights: str = "best",
    overrides: dict[str, Any] | None = None,
    attentions: Sequence[str | None] | None = None,
) -> list[ExplainModel]:
    """Rebuild trained models (run folders or weights files, via `load_run`) for comparison.

    `overrides` apply to every source (for weights files: model, dataset, ...);
    `attentions` gives one attention per source, for weights files of different models.
    Checkpoint errors (weights of another model) come from `cbam.interop.load_checkpoint`.
    The models must classify the same classes from images of the same size and channels.
    """
    from cbam.training.eval_run import load_run

    if not sources:
        raise ValueError("no models given; pass run folders or weights files")
    if names is not None and len(names) != len(sources):
        raise ValueError(f"got {len(names)} names for {len(sources)} models; give one each")
    if attentions is not None and len(attentions) not in (1, len(sources)):
        raise ValueError(
            f"got {len(attentions)} attentions for {len(sources)} models; give one for all "
            f"or one per model"
        )
    models = []
    for i, source in enumerate(sources):
        values = {**(overrides or {}), "data_path": "per-sample"}  # explain reads PIL images
        if attentions is not None:
            values["attention"] = attentions[i if len(attentions) > 1 else 0]
        run = load_run(source, weights, values)
        name = names[i] if names is not None else default_name(run.config)
        models.append(
            ExplainModel(
                name=name,
                model=run.model,
                classes=list(run.splits.classes),
                transform=run.splits.test.transform,
                in_chans=run.splits.in_chans,
                image_size=run.splits.image_size,
                resize=run.config.augment == "small",
                device=run.device,
                splits=run.splits,
            )
        )
    return unique_names(models)


def unique_names(models: list[ExplainModel]) -> list[ExplainModel]:
    """Number repeated names (resnet20+cbam, resnet20+cbam#2) so columns stay distinct."""
    seen: dict[str, int] = {}
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name}#{seen[m.name]}"
    return models


def check_compatible(models: Sequence[ExplainModel]) -> None:
    """Models compared on one figure must read the same images and name the same classes."""
    if not models:
        raise ValueError("no models given")
    first = models[0]
    for m in models[1:]:
        if (m.classes, m.in_chans, m.image_size) != (
            first.classes,
            first.in_chans,
            first.image_size,
        ):
            raise ValueError(
                f"models {first.name!r} and {m.name!r} were trained on different data "
                f"({len(first.classes)} classes, {first.in_chans}x{first.image_size}px vs "
                f"{len(m.classes)} classes, {m.in_chans}x{m.image_size}px); compare models "
                f"trained on the same data set"
            )
