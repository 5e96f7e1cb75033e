"""The images to explain: files, folders or samples of a data set, each with its true class
when it is known. Unreadable input stops with the file's name, before any model runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


@dataclass
class Sample:
    """One image as it was read (any size or mode), with a name for files and figures."""

    name: str
    image: Image.Image
    label: int | None = None  # index into the models' classes; None when unknown


def read_image(path: str | Path) -> Image.Image:
    """Open and decode an image file, or raise a ValueError that names it."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; pass it as a folder of images") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"{path} is not an image that PIL can read ({error}); pass image files (PNG, "
            f"JPEG, ...), a folder of them, or dataset samples (--samples N)"
        ) from None


def _label_from_folder(path: Path, classes: Sequence[str] | None) -> int | None:
    """The class of an image kept in a folder named after it (imagefolder's layout)."""
    if classes is not None and path.parent.name in classes:
        return list(classes).index(path.parent.name)
    return None


def image_files(paths: Sequence[str | Path]) -> list[tuple[Path | None, Path]]:
    """(folder it was found in or None, file): files given as they are, folders searched
    recursively for image suffixes (sorted)."""
    files: list[tuple[Path | None, Path]] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(
                p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"folder {entry} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += [(entry, p) for p in found]
        elif entry.exists():
            files.append((None, entry))
        else:
            raise ValueError(f"{entry} does not exist; pass image files or folders of images")
    return files


def load_images(paths: Sequence[str | Path], classes: Sequence[str] | None = None) -> list[Sample]:
    """Samples from image files and folders. An image inside a folder named after one of
    `classes` (data/val/Coat/x.png) gets that class as its true label; others have none.
    A file given by itself is named by its stem (x), one found in a folder by its own folder
    and stem (Coat/x), as data set samples are. Every file is decoded here, so a non-image
    stops the run before any model work."""
    if not paths:
        raise ValueError("no images given")
    samples = []
    for root, path in image_files(paths):
        name = f"{path.parent.name}/{path.stem}" if root else path.stem
        samples.append(Sample(name, read_image(path), _label_from_folder(path, classes)))
    return samples


def _targets(dataset: Dataset) -> list[int] | None:
    """Labels without decoding images, where the data set keeps them (MNIST, ImageFolder)."""
    if isinstance(dataset, Subset):
        inner = _targets(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(t) for t in targets]


def _sample_name(dataset: Dataset, index: int, split: str) -> str:
    """CLASS/stem for ImageFolder data (so masks can be matched by name), else split[i]."""
    base, inner = dataset, index
    if isinstance(base, Subset):
        base, inner = base.dataset, base.indices[index]
    samples = getattr(base, "samples", None)
    if samples is not None:
        path = Path(samples[inner][0])
        return f"{path.parent.name}/{path.stem}"
    return f"{split}[{index}]"


def _label_of(dataset: Dataset, index: int) -> int:
    item = dataset[index]
    return -1 if item is None else int(item[1])


def dataset_samples(
    dataset: Dataset,
    count: int,
    split: str = "test",
    offset: int = 0,
    per_class: bool = False,
) -> list[Sample]:
    """`count` images of a data set split that yields (PIL image, label), from `offset` on;
    with `per_class`, the first image of each class in turn (a varied figure)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {count!r}")
    size = len(dataset)  # type: ignore[arg-type]
    if not 0 <= offset < size:
        raise ValueError(f"offset {offset} is outside the {split} split (0..{size - 1})")
    indices = list(range(offset, size))
    if per_class:
        targets = _targets(dataset)
        by_class: dict[int, list[int]] = {}
        for i in indices:
            label = targets[i] if targets is not None else _label_of(dataset, i)
            by_class.setdefault(label, []).append(i)
        groups = [by_class[c] for c in sorted(by_class)]
        indices = [g[k] for k in range(max(map(len, groups))) for g in groups if k < len(g)]
    samples = []
    for index in indices:
        if len(samples) == count:
            break
        item = dataset[index]
        if item is None:  # an unreadable imagefolder image, already warned about
            continue
        image, label = item
        samples.append(Sample(_sample_name(dataset, index, split), image, int(label)))
    return samples
