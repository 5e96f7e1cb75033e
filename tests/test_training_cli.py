"""`cbam train`, `cbam eval` and `cbam compare` end to end on tiny subsets."""

import csv
import re

import pytest

from cbam.cli import main

TINY = ["--train-subset", "96", "--test-subset", "64", "--batch-size", "32", "--epochs", "1"]


def test_compare_then_eval(tmp_path, capsys):
    assert main(["compare", *TINY, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = [
        line for line in out.splitlines() if line.startswith("| none") or line.startswith("| cbam")
    ]
    assert len(table) == 2
    with open(tmp_path / "cbam" / "metrics.csv", newline="") as f:
        logged = float(list(csv.DictReader(f))[-1]["test_top1_err"])
    assert f"| {logged:.2f} |" in table[1]

    assert main(["eval", str(tmp_path / "cbam"), "--weights", "last"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"top-1 error {logged:.2f}%", out)
    assert "Ankle boot" in out  # per-class accuracy, by class name

    # Running the same comparison again reuses the finished runs instead of retraining.
    assert main(["compare", *TINY, "--output", str(tmp_path)]) == 0
    assert "epoch 1/1" not in capsys.readouterr().out


def test_train_with_set_and_resume_messages(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, "--attention", "se", "--output", str(run),
            "--set", "attention_kwargs={reduction: 4}", "--set", "ema_decay=0.9"]  # fmt: skip
    assert main(args) == 0
    saved = (run / "config.yaml").read_text()
    assert "reduction: 4" in saved and "ema_decay: 0.9" in saved and "attention: se" in saved
    assert main(["train", "--resume", str(run)]) == 2
    assert "already finished all 1 epochs" in capsys.readouterr().err


def test_bad_options_are_clear_errors(capsys):
    assert main(["train", "--set", "epoch=3"]) == 2
    assert "unknown config key 'epoch'" in capsys.readouterr().err
    assert main(["train", "--model", "resnet5"]) == 2
    assert "unknown model 'resnet5'" in capsys.readouterr().err


def test_small_images_train_with_the_default_recipe_and_no_size_flag(tmp_path, capsys, image_tree):
    """A user's own 32 x 32 PNGs (one of them unreadable), as `cbam train` first meets them:
    the small recipe takes the images' size, says so in the run's first line, and the run
    folder evaluates."""
    data = image_tree(tmp_path / "images", ((32, 32),), per_class=50,
                      classes=("dark", "mid", "light"), broken=True)  # fmt: skip
    run = tmp_path / "run"
    args = ["train", "--model", "resnet20", "--dataset", "imagefolder", "--data-dir", str(data),
            "--output", str(run)]  # fmt: skip
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    # The tensor path decodes the tree once and leaves the unreadable file out of the count.
    assert "imagefolder: 150 train / 150 test images, 32 px, inferred from" in first
    with open(run / "metrics.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert len(logged) == 4  # the recipe's epochs
    assert sum(int(row["skipped_images"]) for row in logged) >= 1  # the unreadable file
    assert main(["eval", str(run), "--weights", "last"]) == 0
    assert f"top-1 error {float(logged[-1]['test_top1_err']):.2f}%" in capsys.readouterr().out
