"""Where the object is: a box or a mask per image, for the peak-in-region rate
(the "pointing game": does the map's maximum land on the object?)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cbam.explain.images import IMAGE_SUFFIXES, Sample, read_image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in model-input pixels; x1, y1 excluded
MaskSpec = str | Path | np.ndarray | Sequence[np.ndarray | None]


def box_mask(box: Sequence[int], size: int) -> np.ndarray:
    """A size x size boolean mask of a box given as x0 y0 x1 y1 (ends excluded)."""
    if len(box) != 4:
        raise ValueError(f"a box is 4 numbers x0 y0 x1 y1, got {list(box)}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(
            f"box x0={x0} y0={y0} x1={x1} y1={y1} is empty or outside the {size}x{size} model "
            f"input; boxes are in the input's pixels: 0 <= x0 < x1 <= {size}, same for y"
        )
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _as_mask(value: np.ndarray | Image.Image, size: int, origin: str) -> np.ndarray:
    """A size x size boolean mask (resized nearest): for image files the white (> 127)
    pixels mark the object, for arrays the non-zero ones."""
    if isinstance(value, Image.Image):
        image = value.convert("L")
    else:
        a = np.asarray(value)
        if a.ndim == 3:
            a = a.max(axis=-1)
        if a.ndim != 2:
            raise ValueError(f"mask {origin} must be H x W, got shape {list(np.shape(value))}")
        image = Image.fromarray((a != 0).astype(np.uint8) * 255)
    if image.size != (size, size):
        image = image.resize((size, size), Image.NEAREST)
    mask = np.asarray(image) > 127
    if not mask.any():
        raise ValueError(f"mask {origin} marks no pixel (white or non-zero pixels mark the object)")
    return mask


def _find_mask_file(folder: Path, name: str) -> Path | None:
    """DIR/NAME.png (any image suffix; NAME may be CLASS/stem), else DIR/stem.png."""
    for stem in dict.fromkeys((name, name.rsplit("/", 1)[-1])):
        for suffix in sorted(IMAGE_SUFFIXES):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def regions_for(
    samples: Sequence[Sample],
    size: int,
    box: Sequence[int] | None = None,
    mask: MaskSpec | None = None,
) -> list[np.ndarray | None]:
    """One boolean region per sample (None: no region for it).

    box: one box for every image. mask: an image file (one mask for every image), a folder
    (DIR/NAME.png for the sample called NAME, e.g. DIR/Coat/x.png or DIR/x.png for Coat/x;
    samples without one get no region), one array
    for all, or a list with one array (or None) per sample. Masks of another size are resized
    to the model input (size x size), whose pixels boxes and masks refer to.
    """
    if box is not None and mask is not None:
        raise ValueError("give either a box or a mask, not both")
    if box is not None:
        region = box_mask(box, size)
        return [region] * len(samples)
    if mask is None:
        return [None] * len(samples)
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if path.is_dir():
            regions: list[np.ndarray | None] = []
            for s in samples:
                found = _find_mask_file(path, s.name)
                regions.append(
                    None if found is None else _as_mask(read_image(found), size, str(found))
                )
            if all(r is None for r in regions):
                raise ValueError(
                    f"mask folder {path} has no mask named like the images (e.g. "
                    f"{samples[0].name}.png for image {samples[0].name!r})"
                )
            return regions
        region = _as_mask(read_image(path), size, str(path))
        return [region] * len(samples)
    if isinstance(mask, np.ndarray):
        region = _as_mask(mask, size, "array")
        return [region] * len(samples)
    if len(mask) != len(samples):
        raise ValueError(f"got {len(mask)} masks for {len(samples)} images; give one each")
    return [None if m is None else _as_mask(m, size, f"#{i}") for i, m in enumerate(mask)]


def peak_in_region(peak: tuple[int, int] | None, region: np.ndarray | None) -> bool | None:
    """Whether the peak (y, x) is on the region; None without a region; False without a peak."""
    if region is None:
        return None
    return peak is not None and bool(region[peak])
