"""An embedded detection set that runs offline: Fashion-MNIST items on larger black canvases.

What it is, plainly: each canvas holds a few 28 x 28 Fashion-MNIST images (from the train
split for the train canvases, the test split for the test canvases), each rescaled by a
random factor and pasted at a random place (pixel-wise maximum where they overlap, which a
limit on overlap keeps rare). An object's box is the tight box of its nonzero pixels; its
category is its Fashion-MNIST class. It is not a natural-image benchmark: it exists so that
`cbam detect train` / `eval` work out of the box and a baseline vs CBAM comparison fits on a
laptop, with the same COCO files and metrics as real data.

Everything is drawn from a generator seeded by (seed, split, image index), so the files are
identical on every machine, and the first N images do not depend on how many are made. They
are written once as PNG files plus COCO instances json under a folder named by the
parameters, and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets import FashionMNIST

from cbam._errors import unknown_kwargs
from cbam.data.fashion_mnist import default_cache, fashion_mnist_root, load_fashion_mnist

VERSION = 1  # bump when the generator changes, so cached sets are rebuilt
SPLITS = ("train", "test")
ITEM_SIZE = 28  # Fashion-MNIST images are 28 x 28
PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class SyntheticSpec:
    """The set's parameters; each combination gets its own folder."""

    canvas: int = 128  # square canvases, in pixels
    train_images: int = 1000
    test_images: int = 250
    min_items: int = 2
    max_items: int = 5
    min_scale: float = 0.8  # item side = 28 x scale pixels (22 to 56 at the defaults)
    max_scale: float = 2.0
    max_overlap: float = 0.2  # largest IoU between two items' pasted squares
    seed: int = 0

    def __post_init__(self) -> None:
        counts = ("canvas", "train_images", "test_images", "min_items", "max_items")
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"synthetic {name} must be a positive integer, got {value!r}")
        if self.min_items > self.max_items:
            raise ValueError(f"synthetic min_items {self.min_items} > max_items {self.max_items}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"synthetic scales must satisfy 0 < min_scale <= max_scale, got "
                f"{self.min_scale}, {self.max_scale}"
            )
        if round(ITEM_SIZE * self.max_scale) > self.canvas:
            raise ValueError(
                f"synthetic items of {ITEM_SIZE} x max_scale {self.max_scale} px do not fit on "
                f"a {self.canvas} px canvas; lower max_scale or enlarge the canvas"
            )

    @property
    def key(self) -> str:
        """Folder name: every parameter, so a changed one never reuses stale files."""
        return (
            f"v{VERSION}-canvas{self.canvas}-items{self.min_items}to{self.max_items}-"
            f"scale{self.min_scale:g}to{self.max_scale:g}-overlap{self.max_overlap:g}-"
            f"train{self.train_images}-test{self.test_images}-seed{self.seed}"
        )

    def images(self, split: str) -> int:
        return self.train_images if split == "train" else self.test_images


def synthetic_spec(options: Mapping[str, Any]) -> SyntheticSpec:
    """A SyntheticSpec from config options, naming any option it does not know."""
    error = unknown_kwargs("synthetic", options, [f.name for f in fields(SyntheticSpec)])
    if error is not None:
        raise error
    return SyntheticSpec(**options)


def synthetic_root(spec: SyntheticSpec, data_dir: str | os.PathLike[str] | None = None) -> Path:
    base = Path(data_dir) if data_dir is not None else default_cache() / "fashion-mnist-detection"
    return base / spec.key


def ensure_synthetic(
    spec: SyntheticSpec | None = None, data_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The set's folder (COCO layout: annotations/instances_{train,test}.json and
    {train,test}/*.png), generated first if it is not there yet.

    It is built in a temporary folder and renamed into place, so an interrupted build leaves
    nothing behind and concurrent builders (DDP ranks) cannot see half a set."""
    spec = spec or SyntheticSpec()
    root = synthetic_root(spec, data_dir)
    if (root / "annotations" / "instances_test.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        fashion = {
            split: load_fashion_mnist(str(fashion_mnist_root()), train=split == "train")
            for split in SPLITS
        }
        for split in SPLITS:
            _write_split(spec, split, fashion[split], tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "annotations" / "instances_test.json").is_file():
                raise  # not another builder's finished copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_split(spec: SyntheticSpec, split: str, items: FashionMNIST, root: Path) -> None:
    images_dir = root / split
    images_dir.mkdir(parents=True)
    pixels = items.data.numpy()
    labels = items.targets.numpy()
    images, annotations = [], []
    for index in range(spec.images(split)):
        canvas, objects = draw_canvas(spec, SPLITS.index(split), index, pixels, labels)
        file_name = f"{index:06d}.png"
        Image.fromarray(canvas).save(images_dir / file_name)
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": spec.canvas, "height": spec.canvas}
        )
        for box, label in objects:
            x, y, w, h = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(items.classes)]
    info: dict[str, Any] = {
        "description": "Fashion-MNIST items on black canvases (cbam.detection.synthetic)",
        "version": VERSION,
        "parameters": asdict(spec),
        "split": split,
    }
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(
            {"info": info, "images": images, "annotations": annotations, "categories": categories},
            f,
        )


def draw_canvas(
    spec: SyntheticSpec, split_code: int, index: int, pixels: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[tuple[list[int], int]]]:
    """One canvas (uint8, canvas x canvas) and its objects as ([x, y, w, h], class index)."""
    rng = np.random.default_rng([spec.seed, split_code, index])
    canvas = np.zeros((spec.canvas, spec.canvas), dtype=np.uint8)
    squares: list[tuple[int, int, int]] = []  # x, y, side of each pasted item
    objects = []
    for _ in range(int(rng.integers(spec.min_items, spec.max_items + 1))):
        item = int(rng.integers(len(pixels)))
        side = round(ITEM_SIZE * rng.uniform(spec.min_scale, spec.max_scale))
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, spec.canvas - side + 1, size=2))
            if all(_square_iou((x, y, side), other) <= spec.max_overlap for other in squares):
                break
        else:
            continue  # no room left for this item: the canvas keeps fewer objects
        resized = Image.fromarray(pixels[item]).resize((side, side), Image.Resampling.BILINEAR)
        patch = np.asarray(resized)
        rows, cols = np.nonzero(patch)
        if rows.size == 0:
            continue
        region = canvas[y : y + side, x : x + side]  # a view: maximum writes into the canvas
        np.maximum(region, patch, out=region)
        squares.append((x, y, side))
        box = [
            x + int(cols.min()), y + int(rows.min()),
            int(cols.max() - cols.min()) + 1, int(rows.max() - rows.min()) + 1,
        ]  # fmt: skip
        objects.append((box, int(labels[item])))
    return canvas, objects


def _square_iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    (ax, ay, aside), (bx, by, bside) = a, b
    w = max(0, min(ax + aside, bx + bside) - max(ax, bx))
    h = max(0, min(ay + aside, by + bside) - max(ay, by))
    inter = w * h
    return inter / (aside**2 + bside**2 - inter)
