"""Find Fashion-MNIST offline: a given folder, Debian's package, an earlier download, or a
download."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from torchvision.datasets import FashionMNIST

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the package puts its files
# A folder of the four files, used instead of the search below when --data-dir is not given;
# `make test` sets it to the folder its `data` step installed, so the tests read only that.
LOCATION_VARIABLE = "CBAM_FASHION_MNIST"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
HOW_TO_GET_IT = (
    f"install Debian's package (`sudo apt-get install {DEBIAN_PACKAGE}`, or `make data` in a "
    f"cbam checkout), or pass --data-dir DIR where DIR holds {', '.join(FILES)} (each may be "
    f".gz) or torchvision's FashionMNIST/raw/ with them"
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


def _unpacked(files: dict[str, Path]) -> Path:
    """A cache root in torchvision's layout holding `files` un-gzipped.

    The root is named by the sources' paths, sizes and modification times, so each source
    is unpacked once, two sources never share a root, and a changed source is unpacked again.
    """
    key = hashlib.sha256()
    for source in files.values():
        stat = source.resolve().stat()
        key.update(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    root = default_cache() / f"fashion-mnist-{key.hexdigest()[:16]}"
    if _has_raw(root):
        return root
    raw = _raw_folder(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():  # each file lands atomically
        with tempfile.NamedTemporaryFile(dir=raw, delete=False) as tmp:
            opener = gzip.open if source.suffix == ".gz" else open
            try:
                with opener(source, "rb") as f:
                    shutil.copyfileobj(f, tmp)
            except (OSError, EOFError) as error:  # a truncated or foreign .gz
                os.unlink(tmp.name)
                raise ValueError(f"{source} cannot be read ({error}); {HOW_TO_GET_IT}") from None
        os.replace(tmp.name, raw / name)
    return root


def load_fashion_mnist(root: str, train: bool) -> FashionMNIST:
    """torchvision's FashionMNIST from `root`; files that are truncated or not idx files are
    a ValueError naming the folder (torchvision stops at a bare assertion or reshape)."""
    try:
        return FashionMNIST(root, train=train)
    except (AssertionError, RuntimeError, ValueError, OSError) as error:
        detail = str(error) or type(error).__name__
        raise ValueError(
            f"the Fashion-MNIST files under {root} are damaged ({detail}): each idx file must "
            f"hold the 60,000 training or 10,000 test images of 28 x 28 or their labels; "
            f"{HOW_TO_GET_IT}"
        ) from None


def _from_folder(folder: Path, named: str) -> Path:
    if _has_raw(folder):
        return folder
    files = _source_files(folder) or _source_files(_raw_folder(folder))
    if files is None:
        state = "does not exist" if not folder.exists() else "does not hold them"
        raise ValueError(
            f"Fashion-MNIST folder {folder} ({named}) {state}: expected {', '.join(FILES)} "
            f"(each may be .gz), or FashionMNIST/raw/ beneath it; {HOW_TO_GET_IT}"
        )
    return _unpacked(files)


def fashion_mnist_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """A root that torchvision's FashionMNIST reads without touching the network.

    With `data_dir` (or else $CBAM_FASHION_MNIST): that folder and nothing else, in
    torchvision's layout or holding the four idx files (gzipped or not), which are unpacked
    into the cache. Without either: Debian's dataset-fashion-mnist, then an earlier download,
    then a torchvision download into the cache.
    """
    if data_dir is not None:
        return _from_folder(Path(data_dir), "--data-dir")
    if os.environ.get(LOCATION_VARIABLE):
        return _from_folder(Path(os.environ[LOCATION_VARIABLE]), f"${LOCATION_VARIABLE}")
    files = _source_files(DEBIAN_DIR)
    if files is not None:
        return _unpacked(files)
    cache = default_cache()
    if _has_raw(cache):
        return cache
    try:
        FashionMNIST(str(cache), download=True)
    except Exception as error:
        raise ValueError(
            f"Fashion-MNIST is not on this machine ({DEBIAN_DIR} is missing) and could not be "
            f"downloaded ({error}); {HOW_TO_GET_IT}"
        ) from None
    return cache
