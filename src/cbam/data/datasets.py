"""Data sets by name, each split wrapped so augmentation is reproducible sample by sample."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

from cbam._errors import unknown_choice
from cbam.data.fashion_mnist import default_cache, fashion_mnist_root, load_fashion_mnist
from cbam.data.resident import ResidentBatches, ResidentSplit, cached_decode, source_key
from cbam.data.transforms import imagenet_transforms, small_image_transforms

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
# "tensor": the split decoded once into one tensor on the training device, augmented a batch
# at a time (resident.py); "per-sample": torchvision transforms image by image in a
# DataLoader; "auto": tensor for the small recipe when the split fits resident_limit_mb.
DATA_PATHS = ("auto", "tensor", "per-sample")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int]] = {
    "fashion-mnist": ((0.2860,), (0.3530,), 28),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32),
}


class SeededTransform(Dataset):
    """Applies `transform` under a generator seeded by (seed, epoch, index).

    A sample's augmentation then depends on nothing else: not the number of loader workers,
    not the process it lands on under DDP, not where an interrupted run resumed.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if item is None:  # an unreadable image, already reported
            return None
        sample_seed = hash((self.seed, self.epoch, index)) % (2**63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.apply(item)

    def apply(self, item: Any) -> Any:
        """Transform one item: the image of an (image, label) pair. Detection overrides it to
        transform an image and its boxes together."""
        image, label = item
        return self.transform(image), label


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that reports an unreadable image by path instead of dying mid-epoch:
    with strict=True it raises; otherwise it warns and yields None, which
    `collate_skipping` drops and counts."""

    def __init__(self, root: str, strict: bool = False) -> None:
        super().__init__(root)
        self.strict = strict

    def __getitem__(self, index: int) -> tuple[Any, int] | None:  # type: ignore[override]
        path, label = self.samples[index]
        image = open_rgb(path, self.strict)
        return None if image is None else (image, label)


def open_rgb(path: str | Path, strict: bool) -> Image.Image | None:
    """An image file as RGB; an unreadable one raises (strict) or warns and gives None."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        message = f"unreadable image {path}: {error}"
        if strict:
            raise ValueError(f"{message}; remove or replace it (strict mode is on)") from None
        warnings.warn(f"skipping {message}", stacklevel=3)
        return None


def collate_skipping(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Default collation of the readable samples, plus how many were skipped."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


Split = SeededTransform | ResidentSplit


@dataclass
class DataSplits:
    train: Split
    test: Split
    num_classes: int
    in_chans: int
    classes: list[str]
    image_size: int
    image_size_note: str = ""  # how image_size was chosen, when the data chose it
    data_path: str = "per-sample"  # "tensor" or "per-sample", as chosen

    def to(self, device: torch.device, channels_last: bool = False) -> DataSplits:
        """These splits with resident tensors moved to `device`, their batches channels_last
        or not (per-sample ones as they are)."""
        if self.data_path != "tensor":
            return self
        train = self.train.to(device, channels_last)  # type: ignore[call-arg]
        return replace(self, train=train, test=self.test.to(device, channels_last))  # type: ignore[call-arg]


def split_batches(
    split: Split,
    indices: Sequence[int],
    batch_size: int,
    *,
    drop_last: bool = False,
    workers: int = 0,
    report_unreadable: bool = True,
    pin_memory: bool = False,
    collate_fn: Callable[..., Any] = collate_skipping,
    generator: torch.Generator | None = None,
) -> ResidentBatches | DataLoader[Any]:
    """The batches of `split` at `indices`, in order, as (images, labels, skipped): resident
    splits slice their tensor; per-sample ones go through a DataLoader (`workers`, ...)."""
    if isinstance(split, ResidentSplit):
        return split.batches(indices, batch_size, drop_last, report_unreadable)
    return DataLoader(
        split, batch_size=batch_size, sampler=list(indices), drop_last=drop_last,
        num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory, generator=generator,
    )  # fmt: skip


def infer_image_size(dataset: CheckedImageFolder, limit: int = 256) -> tuple[int, str]:
    """The side to train small images at when the recipe leaves it open: the shorter side of
    the most common size among up to `limit` images spread over the split (headers only)."""
    samples = dataset.samples[:: max(1, len(dataset.samples) // limit)][:limit]
    sizes: Counter[tuple[int, int]] = Counter()
    for path, _ in samples:
        try:
            with Image.open(path) as image:
                sizes[image.size] += 1
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            continue  # reported by path when training reaches it
    if not sizes:
        raise ValueError(
            f"none of the {len(samples)} images checked in {dataset.root} could be read; "
            f"check the files, or set the size with --image-size N"
        )
    (width, height), count = sizes.most_common(1)[0]
    side = min(width, height)
    note = (
        f"{side} px, inferred from {dataset.root} ({width}x{height} in {count} of "
        f"{sum(sizes.values())} images read{'' if len(sizes) == 1 else '; others are resized'}"
        f"); --image-size N sets it"
    )
    return side, note


def _image_folder(root: Path, split: str, strict: bool) -> CheckedImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise ValueError(
            f"imagefolder data needs {folder}/ with one sub-folder per class "
            f"(ImageNet's layout: {root}/train/CLASS/*.JPEG and {root}/val/CLASS/*.JPEG)"
        )
    try:
        return CheckedImageFolder(str(folder), strict=strict)
    except FileNotFoundError as error:
        raise ValueError(
            f"no images found in {folder}: {error}; put each class's images in its own "
            f"sub-folder ({folder}/CLASS/image.jpg)"
        ) from None


def _cifar(name: str, data_dir: str | None, train: bool) -> datasets.VisionDataset:
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if data_dir is None:
        raise ValueError(
            f"{name} needs --data-dir: a folder holding torchvision's {cls.base_folder}/"
        )
    try:
        return cls(data_dir, train=train, download=False)
    except RuntimeError:
        raise ValueError(
            f"{name} not found in {data_dir}: expected torchvision's {cls.base_folder}/ there "
            f"(e.g. from torchvision.datasets.{cls.__name__}(root, download=True) on a "
            f"machine with internet)"
        ) from None


def build_datasets(
    name: str,
    data_dir: str | None = None,
    augment: str = "small",
    image_size: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    strict_data: bool = False,
    seed: int = 0,
    data_path: str = "per-sample",
    resident_limit_mb: float = 2048,
) -> DataSplits:
    """Train and test splits of a data set by name, with the recipe's augmentation, either
    per sample (torchvision transforms) or resident (see DATA_PATHS)."""
    if name not in DATASETS:
        raise unknown_choice("dataset", name, DATASETS)
    if data_path not in DATA_PATHS:
        raise unknown_choice("data_path", data_path, DATA_PATHS)
    if name == "fashion-mnist":
        root = str(fashion_mnist_root(data_dir))
        train, test = load_fashion_mnist(root, True), load_fashion_mnist(root, False)
        classes = list(train.classes)
    elif name in ("cifar10", "cifar100"):
        train, test = _cifar(name, data_dir, True), _cifar(name, data_dir, False)
        classes = list(train.classes)  # type: ignore[attr-defined]
    else:
        if data_dir is None:
            raise ValueError("imagefolder needs --data-dir pointing at a train/ + val/ tree")
        train = _image_folder(Path(data_dir), "train", strict_data)
        test = _image_folder(Path(data_dir), "val", strict_data)
        if test.classes != train.classes:
            raise ValueError(
                f"train/ and val/ in {data_dir} have different class folders "
                f"({len(train.classes)} vs {len(test.classes)}); they must match"
            )
        classes = list(train.classes)
    if len(train) == 0 or len(test) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} in {data_dir} has an empty split; check the folder")

    mean, std, native = STATS.get(name, (IMAGENET_MEAN, IMAGENET_STD, None))
    size, size_note = image_size or native, ""
    if size is None:  # an imagefolder tree: 224 for the ImageNet recipe, else its own size
        size, size_note = (224, "") if augment == "imagenet" else infer_image_size(train)
    resize = size != native
    chosen = _choose_data_path(
        data_path,
        augment,
        len(train) + len(test),
        len(mean) * size * size,
        resident_limit_mb,  # type: ignore[arg-type]
    )
    if chosen == "tensor":
        cache = default_cache() / "resident"
        train_split: Split = _resident(name, "train", train, size, resize, cache, mean, std, seed)
        test_split: Split = _resident(name, "test", test, size, resize, cache, mean, std, seed)
        train_split, test_split = train_split.first(train_subset), test_split.first(test_subset)
    else:
        if augment == "small":
            train_tf, test_tf = small_image_transforms(size, resize, mean, std)
        else:
            train_tf, test_tf = imagenet_transforms(size, mean, std)

        def first(dataset: Dataset, n: int | None) -> Dataset:
            return dataset if n is None else Subset(dataset, range(min(n, len(dataset))))  # type: ignore[arg-type]

        train_split = SeededTransform(first(train, train_subset), train_tf, seed)
        test_split = SeededTransform(first(test, test_subset), test_tf, seed)
    return DataSplits(
        train=train_split,
        test=test_split,
        num_classes=len(classes),
        in_chans=len(mean),
        classes=classes,
        image_size=size,
        image_size_note=size_note,
        data_path=chosen,
    )


def _choose_data_path(
    data_path: str, augment: str, n_images: int, image_bytes: int, limit_mb: float
) -> str:
    size_mb = n_images * image_bytes / 2**20
    if data_path == "tensor" and augment != "small":
        raise ValueError(
            f"the tensor-resident data path does the small recipe's pad-crop + flip, not "
            f"augment: {augment}; use --data-path per-sample (or auto) for it"
        )
    if data_path != "auto":
        return data_path
    return "tensor" if augment == "small" and size_mb <= limit_mb else "per-sample"


def _resident(
    name: str,
    split: str,
    dataset: Any,
    size: int,
    resize: bool,
    cache: Path,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
) -> ResidentSplit:
    """A split decoded to uint8 at `size` (through the disk cache) as a ResidentSplit."""
    if isinstance(dataset, CheckedImageFolder):
        files = [Path(path) for path, _ in dataset.samples]
        decode = lambda: _decode_folder(dataset, size)  # noqa: E731
    else:
        files = _array_sources(dataset)
        decode = lambda: _decode_array(dataset, size, resize)  # noqa: E731
    strict = getattr(dataset, "strict", False)  # a strict decode raises at a broken image
    described = {"dataset": name, "split": split, "size": size, "resize": resize, "strict": strict}
    key = source_key(described, files)
    images, labels, unreadable = cached_decode(cache, f"{name}-{split}-{key}", decode)
    return ResidentSplit(images, labels, mean, std, augment=split == "train", seed=seed,
                         unreadable=unreadable)  # fmt: skip


def _array_sources(dataset: datasets.VisionDataset) -> list[Path]:
    """The files torchvision's FashionMNIST or CIFAR reads for this split."""
    if isinstance(dataset, datasets.FashionMNIST):
        prefix = "train" if dataset.train else "t10k"
        return sorted(Path(dataset.raw_folder).glob(f"{prefix}-*-ubyte"))
    names = dataset.train_list if dataset.train else dataset.test_list  # type: ignore[attr-defined]
    return [Path(dataset.root) / dataset.base_folder / name for name, _ in names]  # type: ignore[attr-defined]


def _decode_array(
    dataset: datasets.VisionDataset, size: int, resize: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A torchvision data set that holds its split as one array (N x H x W [x C] uint8)."""
    data = torch.as_tensor(dataset.data)  # type: ignore[attr-defined]
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    if resize:
        images = TF.center_crop(TF.resize(images, [size], antialias=True), [size])
    return images.contiguous(), torch.as_tensor(dataset.targets), 0  # type: ignore[attr-defined]


def _decode_folder(
    dataset: CheckedImageFolder, size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every readable image of an imagefolder split, shorter side resized to `size` and
    center-cropped; unreadable ones are reported by path and counted (strict: raise)."""
    images, labels = [], []
    for path, label in dataset.samples:
        image = open_rgb(path, dataset.strict)
        if image is not None:
            image = TF.center_crop(TF.resize(image, [size], antialias=True), [size])
            images.append(TF.pil_to_tensor(image))
            labels.append(label)
    if not images:
        raise ValueError(f"no image in {dataset.root} could be read; check the files")
    return torch.stack(images), torch.tensor(labels), len(dataset.samples) - len(images)
