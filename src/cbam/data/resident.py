"""Small data sets as one uint8 tensor on the training device, augmented a batch at a time.

Per-sample PIL work, a forked RNG per image and collation cost a quarter to a half of a small
model's training time on CPU (issue 20). Here a split is decoded once (and cached on disk),
and a batch is one gather from the resident tensor: pad-4 random crop and horizontal flip as
index arithmetic, then normalisation as one multiply-add. Each sample's crop offsets and flip
come from a counter-based hash of (seed, epoch, index), so a sample's augmentation depends on
nothing else: not the batch it lands in, not the process under DDP, not where a run resumed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PADDING = 4  # the CIFAR ResNet recipe's pad-4 crop (He et al. 2016)
FORMAT = "cbam-resident-1"  # bump when what a cache file holds changes
_MASK = 0xFFFFFFFF
_STREAMS = {"dy": 1, "dx": 2, "flip": 3}


def mix32(x: int | torch.Tensor) -> int | torch.Tensor:
    """A bijective 32-bit integer hash (two multiply-xorshift rounds), on Python ints or int64
    tensors alike. Every product stays below 2**59, so int64 arithmetic never overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    return (x >> 16) ^ x


def _epoch_key(seed: int, epoch: int) -> int:
    key = mix32((seed + 0x9E3779B9) & _MASK)
    key = mix32(key ^ ((seed >> 32) & _MASK))
    return int(mix32(key ^ (epoch & _MASK)))


def augment_draws(
    seed: int, epoch: int, index: int | torch.Tensor, padding: int = PADDING
) -> tuple[int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
    """(row offset, column offset, flip) of the sample(s) `index` in `epoch`: offsets in
    [0, 2 * padding] into the padded image, flip 0 or 1. A pure function of its arguments."""
    sample = mix32(_epoch_key(seed, epoch) ^ index)
    span = 2 * padding + 1
    dy = mix32(sample ^ _STREAMS["dy"]) % span
    dx = mix32(sample ^ _STREAMS["dx"]) % span
    flip = mix32(sample ^ _STREAMS["flip"]) & 1
    return dy, dx, flip


def pad_crop_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    padding: int = PADDING,
) -> torch.Tensor:
    """Each image zero-padded by `padding`, cropped back to its size at (dy[i], dx[i]) and
    mirrored where flip[i]: torchvision's RandomCrop(padding) + RandomHorizontalFlip, for a
    whole batch in one gather."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = dy[:, None] + torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    cols = dx[:, None] + torch.where(flip[:, None].bool(), width - 1 - cols, cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    return crops.permute(0, 3, 1, 2)  # channels_last in memory; callers choose the layout


class ResidentSplit:
    """One split held as a uint8 N x C x H x W tensor; `batch(indices)` returns it
    augmented (train) and normalised, on the tensor's device, in `memory_format` (set by
    `to`: channels_last batches come straight out of the gather, with no copy to convert)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        seed: int,
        unreadable: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"a resident split needs uint8 N x C x H x W images and N labels, got "
                f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1 / (255 * std_t)).view(1, -1, 1, 1).to(images.device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)
        self.shift = self.shift.to(images.device)
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.memory_format = torch.contiguous_format
        self.unreadable = unreadable  # images left out at decoding, reported once per epoch

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def to(self, device: torch.device | str, channels_last: bool = False) -> ResidentSplit:
        """This split with its tensors on `device`, making batches channels_last or not (the
        same object if nothing changes)."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if torch.device(device) == self.device and memory_format == self.memory_format:
            return self
        moved = copy.copy(self)
        for name in ("images", "labels", "scale", "shift"):
            setattr(moved, name, getattr(self, name).to(device))
        moved.memory_format = memory_format
        return moved

    def first(self, n: int | None) -> ResidentSplit:
        """The split's first `n` samples (all of it for None), sharing memory."""
        if n is None or n >= len(self):
            return self
        part = copy.copy(self)
        part.images, part.labels = self.images[:n], self.labels[:n]
        return part

    def uint8_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The samples at `indices`, augmented when this is a training split, still uint8."""
        indices = indices.to(self.device)
        images = self.images.index_select(0, indices)
        if self.augment:
            dy, dx, flip = augment_draws(self.seed, self.epoch, indices)
            images = pad_crop_flip(images, dy, dx, flip)  # type: ignore[arg-type]
        return images.contiguous(memory_format=self.memory_format)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 images, labels) of the samples at `indices`; the conversion
        and the multiply-add keep the uint8 batch's memory format."""
        images = self.uint8_batch(indices).float().mul_(self.scale).add_(self.shift)
        return images, self.labels.index_select(0, indices.to(self.device))

    def batches(
        self, indices: Sequence[int], batch_size: int, drop_last: bool, report_unreadable: bool
    ) -> ResidentBatches:
        return ResidentBatches(self, indices, batch_size, drop_last, report_unreadable)


class ResidentBatches:
    """The batches of `indices` in order, as (images, labels, skipped) like a DataLoader with
    `collate_skipping`; `skipped` carries the split's unreadable count once, with the first
    batch, when `report_unreadable` (rank 0, an epoch from its start)."""

    def __init__(
        self,
        split: ResidentSplit,
        indices: Sequence[int],
        batch_size: int,
        drop_last: bool,
        report_unreadable: bool,
    ) -> None:
        self.split, self.batch_size = split, batch_size
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.drop_last, self.report = drop_last, report_unreadable

    def __len__(self) -> int:
        n, b = len(self.indices), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        indices = self.indices.to(self.split.device)
        for i in range(len(self)):
            images, labels = self.split.batch(
                indices[i * self.batch_size : (i + 1) * self.batch_size]
            )
            yield images, labels, self.split.unreadable if (i == 0 and self.report) else 0


# ---- the on-disk cache ------------------------------------------------------------------


def source_key(description: dict[str, object], files: Sequence[Path]) -> str:
    """A name for a decoded split: what was decoded how (`description`), and the path, size
    and modification time of every source file, so a changed source gets a new cache file."""
    key = hashlib.sha256(json.dumps({"format": FORMAT, **description}, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        key.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return key.hexdigest()[:24]


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(tensor.contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The cached split, or None with a warning when the file is damaged in any way."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len < 1 << 20 else {}
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        tensors = load_file(str(path))
        images, labels = tensors["images"], tensors["labels"]
        if _checksum(images, labels) != meta.get("sha256"):
            raise ValueError("its checksum does not match its contents")
        return images, labels, int(meta["unreadable"])
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        warnings.warn(
            f"the decoded-data cache {path} is damaged ({error}); decoding the source again "
            f"and rewriting it",
            stacklevel=3,
        )
        return None


def cached_decode(
    cache_dir: Path, name: str, decode: Callable[[], tuple[torch.Tensor, torch.Tensor, int]]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 images, labels, unreadable count) from `cache_dir/name.safetensors`, or from
    `decode()` when there is no intact cache file, which is then written atomically. A damaged
    file (truncated, altered, foreign) is never used: it warns and is rebuilt."""
    path = cache_dir / f"{name}.safetensors"
    if path.is_file():
        found = _read_cache(path)
        if found is not None:
            return found
    images, labels, unreadable = decode()
    images, labels = images.contiguous(), labels.long().contiguous()
    meta = {"format": FORMAT, "sha256": _checksum(images, labels), "unreadable": str(unreadable)}
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as file:
            tmp = Path(file.name)
        save_file({"images": images, "labels": labels}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as error:  # a read-only or full cache: train on, decode again next time
        warnings.warn(f"could not write the decoded-data cache {path}: {error}", stacklevel=2)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return images, labels, unreadable
