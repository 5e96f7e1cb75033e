"""The tensor-resident data path: batched augmentation, its per-sample definition, DDP shares,
the disk cache, and the choice of path."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.transforms.v2 import functional as TF

from cbam.data import build_datasets, split_batches
from cbam.data.resident import (
    PADDING,
    ResidentSplit,
    augment_draws,
    cached_decode,
    mix32,
)


def random_split(n: int = 64, channels: int = 3, size: int = 12, seed: int = 5) -> ResidentSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ResidentSplit(images, labels, [0.5] * channels, [0.25] * channels, True, seed=3)


def per_sample(image: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    """The definition, one image at a time with torchvision: draws from Python ints, then
    pad, crop, flip."""
    dy, dx, flip = augment_draws(seed, epoch, index)
    assert all(isinstance(v, int) for v in (dy, dx, flip))
    height, width = image.shape[-2:]
    out = TF.crop(TF.pad(image, [PADDING]), dy, dx, height, width)
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_batched_augmentation_equals_its_per_sample_definition(epoch):
    split = random_split()
    split.set_epoch(epoch)
    indices = torch.tensor([3, 0, 63, 17, 17, 42])
    batch = split.uint8_batch(indices)
    for row, index in enumerate(indices.tolist()):
        expected = per_sample(split.images[index], 3, epoch, index)
        assert torch.equal(batch[row], expected), (epoch, index)
    images, labels = split.batch(indices)
    assert torch.allclose(images, (batch.float() / 255 - 0.5) / 0.25, atol=1e-5)
    assert torch.equal(labels, split.labels[indices])


def test_draws_are_spread_and_depend_on_seed_epoch_and_index():
    index = torch.arange(20000)
    dy, dx, flip = augment_draws(0, 0, index)
    for draws, values in ((dy, 2 * PADDING + 1), (dx, 2 * PADDING + 1), (flip, 2)):
        counts = torch.bincount(draws, minlength=values).float()
        assert len(counts) == values and counts.min() > 0.9 * counts.mean()
    assert (dy == dx).float().mean() < 0.2  # two streams, not one
    for other in (augment_draws(1, 0, index), augment_draws(0, 1, index)):
        assert (other[0] != dy).float().mean() > 0.8
    assert mix32(torch.tensor([12345]))[0].item() == mix32(12345)


def test_a_batch_does_not_depend_on_its_neighbours_or_the_device_copy():
    split = random_split()
    alone = split.uint8_batch(torch.tensor([9]))
    together = split.uint8_batch(torch.tensor([1, 9, 30]))[1:2]
    assert torch.equal(alone, together)
    assert torch.equal(split.to("cpu").uint8_batch(torch.tensor([9])), alone)
    assert split.first(10).uint8_batch(torch.tensor([9])).equal(alone)


def test_evaluation_batches_are_not_augmented():
    split = random_split()
    split.augment = False
    assert torch.equal(split.uint8_batch(torch.tensor([4, 5])), split.images[4:6])


def test_two_ranks_see_the_samples_and_images_of_one_process():
    """DistributedSampler's shares over 2 ranks, batched on each rank, hold exactly the
    images one process makes for the same indices."""
    split = random_split(n=50)
    split.set_epoch(2)
    one = DistributedSampler(split, num_replicas=1, rank=0, shuffle=True, seed=0)
    one.set_epoch(2)
    reference = {i: split.uint8_batch(torch.tensor([i]))[0] for i in one}
    seen: list[int] = []
    for rank in range(2):
        sampler = DistributedSampler(split, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(2)
        indices = list(sampler)
        seen += indices
        images = torch.cat([b[0] for b in split_batches(split, indices, 8)])
        assert len(images) == len(indices)
        expected = torch.stack([reference[i] for i in indices]).float()
        assert torch.allclose(images, (expected / 255 - 0.5) / 0.25, atol=1e-5)
    assert sorted(set(seen)) == sorted(one)  # 50 over 2 ranks: no padding needed


def test_batches_report_unreadable_images_once():
    split = random_split(n=20)
    split.unreadable = 3
    skipped = [b[2] for b in split_batches(split, range(20), 8)]
    assert skipped == [3, 0, 0]
    assert [b[2] for b in split_batches(split, range(20), 8, report_unreadable=False)] == [0] * 3
    assert len(split_batches(split, range(20), 8, drop_last=True)) == 2


def _decoder(calls: list[int]):
    def decode():
        calls.append(1)
        return torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 3, 2, 2), torch.tensor([1, 0]), 0

    return decode


def test_the_cache_is_written_once_and_read_back(tmp_path):
    calls: list[int] = []
    first = cached_decode(tmp_path, "split", _decoder(calls))
    second = cached_decode(tmp_path, "split", _decoder(calls))
    assert calls == [1]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert [p.name for p in tmp_path.iterdir()] == ["split.safetensors"]  # no temporary left


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "foreign", "empty"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(tmp_path, damage):
    calls: list[int] = []
    good = cached_decode(tmp_path, "split", _decoder(calls))
    path = tmp_path / "split.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 5])
    elif damage == "flip-a-byte":  # the last byte is a label's: the tensors still load
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "foreign":
        from safetensors.torch import save_file

        save_file({"images": torch.zeros(2, 3, 2, 2, dtype=torch.uint8)}, str(path))
    else:
        path.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"cache .* is damaged .* decoding the source again"):
        rebuilt = cached_decode(tmp_path, "split", _decoder(calls))
    assert calls == [1, 1]
    assert torch.equal(rebuilt[0], good[0]) and torch.equal(rebuilt[1], good[1])
    cached_decode(tmp_path, "split", _decoder(calls))  # the rewritten file is intact
    assert calls == [1, 1]


def test_an_unwritable_cache_warns_and_trains_on(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        cache = blocker / "sub"  # a folder under a file cannot be made, even by root
    else:
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o500)
    calls: list[int] = []
    with pytest.warns(UserWarning, match="could not write the decoded-data cache"):
        images, _, _ = cached_decode(cache, "split", _decoder(calls))
    assert images.shape == (2, 3, 2, 2)


def test_fashion_mnist_resident_split_matches_the_per_sample_images():
    tensor = build_datasets("fashion-mnist", None, train_subset=32, test_subset=16,
                            data_path="tensor")  # fmt: skip
    sample = build_datasets("fashion-mnist", None, train_subset=32, test_subset=16,
                            data_path="per-sample")  # fmt: skip
    assert tensor.data_path == "tensor" and sample.data_path == "per-sample"
    assert (len(tensor.train), len(tensor.test)) == (32, 16)
    images, labels = tensor.test.batch(torch.arange(16))
    for i in range(16):
        image, label = sample.test[i]
        assert torch.allclose(images[i], image, atol=1e-5) and labels[i] == label
    auto = build_datasets("fashion-mnist", None, data_path="auto")
    assert auto.data_path == "tensor"
    small_limit = build_datasets("fashion-mnist", None, data_path="auto",
                                 resident_limit_mb=1)  # fmt: skip
    assert small_limit.data_path == "per-sample"


def test_data_path_errors():
    with pytest.raises(ValueError, match=r"data_path.*tensor"):
        build_datasets("fashion-mnist", None, data_path="gpu")
    with pytest.raises(ValueError, match="per-sample"):
        build_datasets("fashion-mnist", None, augment="imagenet", data_path="tensor")


def test_channels_last_batches_come_out_of_the_gather_in_that_layout():
    split = random_split()
    split.set_epoch(1)
    indices = torch.tensor([5, 2, 40])
    labels = split.batch(indices)[1]
    for augment in (True, False):
        split.augment = augment
        expected = split.to("cpu").batch(indices)[0]
        images, same_labels = split.to("cpu", channels_last=True).batch(indices)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert not images.is_contiguous() and expected.is_contiguous()
        assert torch.equal(images, expected) and torch.equal(same_labels, labels)
    assert torch.equal(split.to("cpu").batch(indices)[0], split.batch(indices)[0])
    assert split.to("cpu") is split
