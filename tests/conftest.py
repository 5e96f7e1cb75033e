"""Shared test helpers."""

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

COLOURS = {"dark": 30, "mid": 120, "light": 220}


def write_image_tree(
    root: Path,
    sizes: tuple[tuple[int, int], ...] = ((16, 16),),
    per_class: int = 8,
    classes: tuple[str, ...] = ("dark", "light"),
    broken: bool = False,
) -> Path:
    """An imagefolder tree (train/ and val/, one folder per class) of solid-colour PNGs, the
    i-th of each class of size sizes[i % len(sizes)]; `broken` adds train/CLASS/broken.png,
    a file that is not an image."""
    for split in ("train", "val"):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                colour = (COLOURS[label], COLOURS[label] + i % 30, COLOURS[label])
                Image.new("RGB", sizes[i % len(sizes)], colour).save(folder / f"{i}.png")
    if broken:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n not really")
    return root


@pytest.fixture
def image_tree() -> Callable[..., Path]:
    return write_image_tree
