"""Find Fashion-MNIST offline: a given folder, our cache, Debian's package, or a download."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from torchvision.datasets import FashionMNIST

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cbam" / "datasets"


def _raw_folder(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _has_raw(root: Path) -> bool:
    return all((_raw_folder(root) / name).is_file() for name in FILES)


def _source_files(folder: Path) -> dict[str, Path] | None:
    """The four idx files in `folder`, plain or gzipped, or None if any is missing."""
    found = {}
    for name in FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def _unpack(files: dict[str, Path], root: Path) -> None:
    """Copy (un-gzipping) into torchvision's layout; each file lands atomically."""
    raw = _raw_folder(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        with tempfile.NamedTemporaryFile(dir=raw, delete=False) as tmp:
            opener = gzip.open if source.suffix == ".gz" else open
            with opener(source, "rb") as f:
                shutil.copyfileobj(f, tmp)
        os.replace(tmp.name, raw / name)


def fashion_mnist_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """A root that torchvision's FashionMNIST reads without touching the network.

    With `data_dir`: that folder in torchvision's layout, or a folder holding the four idx
    files (gzipped or not), which are unpacked into the cache. Without: the cache, then
    Debian's dataset-fashion-mnist, then a torchvision download into the cache.
    """
    cache = default_cache()
    if data_dir is not None:
        folder = Path(data_dir)
        if _has_raw(folder):
            return folder
        files = _source_files(folder) or _source_files(_raw_folder(folder))
        if files is None:
            state = "does not exist" if not folder.exists() else "does not hold them"
            raise ValueError(
                f"Fashion-MNIST data folder {folder} {state}: expected {', '.join(FILES)} "
                f"(optionally .gz), or FashionMNIST/raw/ beneath it; install Debian's "
                f"dataset-fashion-mnist (files in {DEBIAN_DIR}) or drop --data-dir to use it"
            )
        _unpack(files, cache)
        return cache
    if _has_raw(cache):
        return cache
    files = _source_files(DEBIAN_DIR)
    if files is not None:
        _unpack(files, cache)
        return cache
    try:
        FashionMNIST(str(cache), download=True)
    except Exception as error:
        raise ValueError(
            f"Fashion-MNIST is not on this machine and could not be downloaded ({error}); "
            f"install it with `apt-get install dataset-fashion-mnist` or pass --data-dir"
        ) from None
    return cache
