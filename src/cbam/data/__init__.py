"""Data sets and transforms (torchvision), reproducible per sample."""

from cbam.data.datasets import (
    DATA_PATHS,
    DATASETS,
    DataSplits,
    build_datasets,
    collate_skipping,
    split_batches,
)
from cbam.data.fashion_mnist import fashion_mnist_root

__all__ = [
    "DATASETS",
    "DATA_PATHS",
    "DataSplits",
    "build_datasets",
    "collate_skipping",
    "fashion_mnist_root",
    "split_batches",
]
