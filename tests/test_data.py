"""Where the data comes from: Fashion-MNIST's lookup and the size of an imagefolder's images."""

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from cbam.data import build_datasets, fashion_mnist
from cbam.data.fashion_mnist import FILES, LOCATION_VARIABLE, fashion_mnist_root


def test_the_tests_read_fashion_mnist_from_what_make_data_installed():
    """`make test` passes the folder its `data` step filled; the tests read nothing else. At
    the default folder the files must be the Debian package's own, byte for byte, so data put
    there by hand (which once hid a missing install step) fails here."""
    location = os.environ.get(LOCATION_VARIABLE)
    assert location, (
        f"${LOCATION_VARIABLE} is not set: run the tests with `make test`, whose `data` step "
        f"installs Fashion-MNIST and passes its folder"
    )
    folder = Path(location)
    found = {name: folder / f"{name}.gz" for name in FILES}
    if folder == fashion_mnist.DEBIAN_DIR:
        md5sums = Path(f"/var/lib/dpkg/info/{fashion_mnist.DEBIAN_PACKAGE}.md5sums")
        assert md5sums.is_file(), f"{fashion_mnist.DEBIAN_PACKAGE} is not installed"
        listed = dict(reversed(line.split()) for line in md5sums.read_text().splitlines())
        for path in found.values():
            expected = listed.get(str(path).lstrip("/"))
            assert expected, f"{path} is not a file of {fashion_mnist.DEBIAN_PACKAGE}"
            assert hashlib.md5(path.read_bytes()).hexdigest() == expected, f"{path} was changed"
    else:
        assert fashion_mnist._source_files(folder), f"{folder} lacks the four idx files"
    root = fashion_mnist_root()
    assert root != fashion_mnist.default_cache()  # not an earlier download
    assert (root / "FashionMNIST" / "raw" / FILES[0]).stat().st_size == 47040016


def test_a_folder_named_by_the_variable_is_used_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCATION_VARIABLE, str(tmp_path))
    with pytest.raises(ValueError, match=rf"{tmp_path} \(\${LOCATION_VARIABLE}\) does not hold"):
        fashion_mnist_root()


def test_no_data_and_no_download_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCATION_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-package")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fashion_mnist, "FashionMNIST", offline)
    with pytest.raises(ValueError) as error:
        fashion_mnist_root()
    message = str(error.value)
    for part in ("not on this machine", "network is unreachable",
                 "sudo apt-get install dataset-fashion-mnist", "make data",
                 "--data-dir DIR where DIR holds train-images-idx3-ubyte"):  # fmt: skip
        assert part in message, part


def test_a_folder_of_gzipped_files_is_unpacked_once_and_again_when_it_changes(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "source"
    source.mkdir()
    for name in FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress(name.encode()))
    first = fashion_mnist_root(source)
    assert (first / "FashionMNIST" / "raw" / FILES[0]).read_bytes() == FILES[0].encode()
    assert fashion_mnist_root(source) == first
    (source / f"{FILES[0]}.gz").write_bytes(gzip.compress(b"a newer version"))
    second = fashion_mnist_root(source)
    assert second != first
    assert (second / "FashionMNIST" / "raw" / FILES[0]).read_bytes() == b"a newer version"


def test_small_images_train_at_their_own_size_with_the_small_recipe(tmp_path, image_tree):
    root = image_tree(tmp_path, ((32, 32),), per_class=4, broken=True)
    splits = build_datasets("imagefolder", str(root), augment="small")
    assert splits.image_size == 32
    assert "32 px, inferred from" in splits.image_size_note
    assert "32x32 in 8 of 8 images read" in splits.image_size_note
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 32, 32)
    paths = [path for path, _ in splits.train.dataset.samples]
    with pytest.warns(UserWarning, match="broken.png"):
        assert splits.train[paths.index(str(root / "train" / "dark" / "broken.png"))] is None


def test_images_of_several_sizes_are_resized_to_the_most_common(tmp_path, image_tree):
    root = image_tree(tmp_path, ((24, 24), (40, 30), (24, 24)), per_class=3)
    splits = build_datasets("imagefolder", str(root), augment="small")
    assert splits.image_size == 24 and "others are resized" in splits.image_size_note
    for split in (splits.train, splits.test):
        assert {tuple(split[i][0].shape) for i in range(len(split))} == {(3, 24, 24)}


def test_a_given_size_or_the_imagenet_recipe_decides_without_reading_images(tmp_path, image_tree):
    root = image_tree(tmp_path, ((32, 32),), per_class=4)
    given = build_datasets("imagefolder", str(root), augment="small", image_size=20)
    assert given.image_size == 20 and given.image_size_note == ""
    assert given.train[0][0].shape == given.test[0][0].shape == (3, 20, 20)
    assert build_datasets("imagefolder", str(root), augment="imagenet").image_size == 224


def test_a_tree_of_unreadable_images_is_a_clear_error(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"none of the 1 images .* --image-size N"):
        build_datasets("imagefolder", str(tmp_path), augment="small")
