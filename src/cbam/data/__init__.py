"""Data sets and transforms (torchvision), reproducible per sample."""

from cbam.data.datasets import DATASETS, DataSplits, build_datasets, collate_skipping
from cbam.data.fashion_mnist import fashion_mnist_root

__all__ = ["DATASETS", "DataSplits", "build_datasets", "collate_skipping", "fashion_mnist_root"]
