"""Every subcommand over a table of a user's mistakes: each must exit non-zero with one line
on stderr that names the problem (no traceback), before any work, writing nothing.

Each case runs `cbam.cli.main` in an empty working folder (where every command writes by
default) and checks: exit code 2, stderr is one line `cbam ...: error: ...` containing the
expected words, no "Traceback", nothing on stdout, and the folder still empty."""

from __future__ import annotations

import gzip

import pytest
import torch
from safetensors.torch import save_file

from cbam import create_model
from cbam.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

# (arguments, words the one line must contain); "{bad}" is a folder of damaged Fashion-MNIST
# files, "{file}" a text file, "{junk}" a .safetensors of garbage, "{weights}" a ResNet-20's
# weights, "{empty}" an empty folder.
CASES: list[tuple[list[str], str]] = [
    ([], "required"),
    (["nosuch"], "invalid choice"),
    # train (compare and reproduce share its options and config checks)
    (["train", "--set", "lr=[1,2"], "not a YAML value"),
    (["train", "--set", "lr"], "KEY=VALUE"),
    (["train", "--set", "nokey=1"], "unknown config key"),
    (["train", "--set", "lr=abc"], "lr takes a finite number"),
    (["train", "--lr", "nan"], "lr takes a finite number"),
    (["train", "--lr", "-1"], "lr must be positive"),
    (["train", "--set", "epochs=2.5"], "epochs takes an integer"),
    (["train", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--epochs", "x"], "invalid int value"),
    (["train", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["train", "--workers", "-1"], "workers must be >= 0"),
    (["train", "--image-size", "0"], "image_size"),
    (["train", "--checkpoint-every", "-3"], "checkpoint_every"),
    (["train", "--device", "foo"], "unknown device"),
    pytest.param(["train", "--device", "cuda"], "no usable CUDA", marks=NO_CUDA),
    (["train", "--model", "resnet99"], "unknown model"),
    (["train", "--attention", "fooattn"], "unknown attention"),
    (["train", "--set", "attention_kwargs={kernel_size: 4}"], "kernel_size must be odd"),
    (["train", "--config", "nosuch"], "does not exist"),
    (["train", "--config", "{file}"], "must hold a mapping"),
    (["train", "--dataset", "mnist"], "unknown dataset"),
    (["train", "--data-dir", "/nonexistent"], "does not exist"),
    (["train", "--data-dir", "{bad}"], "dataset-fashion-mnist"),
    (["train", "--resume", "/nonexistent"], "nothing to resume"),
    (["train", "--attach", "cbam"], "torchvision:NAME"),
    (["train", "--model", "torchvision:resnet18", "--attach", "fooattn"], "unknown attention"),
    (["train", "--model", "torchvision:nosuch", "--attach", "cbam"], "unknown torchvision"),
    (["train", "--model", "torchvision:resnet18", "--pretrained", "/no.pth"], "not found"),
    (["train", "--output", "{file}/run"], "is a file, not a folder"),
    (["compare", "--attentions", "none", "fooattn"], "unknown attention"),
    (["compare", "--output", "{file}"], "is a file, not a folder"),
    (["reproduce", "spatial", "--output", "{file}"], "is a file, not a folder"),
    (["compare", "--attentions"], "expected at least one argument"),
    (["compare", "--set", "lr=[1"], "not a YAML value"),
    (["reproduce", "nosuch"], "invalid choice"),
    (["reproduce", "architectures", "--models", "nosuch"], "unknown model"),
    (["reproduce", "architectures", "--seeds", "0"], "seeds must be a positive integer"),
    (["reproduce", "architectures", "--jobs", "0"], "--jobs 0"),
    (["reproduce", "spatial", "--device", "foo"], "unknown device"),
    # evaluation, explanation, export
    (["eval", "/nonexistent"], "does not exist"),
    (["eval", "{file}"], "neither a run folder nor a weights file"),
    (["eval", "{junk}", "--model", "resnet20"], "{junk}"),
    (["eval", "/nonexistent", "--json", "/nonexistent/m.json"], "does not exist"),
    (["eval", "{weights}", "--model", "resnet50"], "does not fit ResNet"),
    (["eval", "{weights}", "--model", "resnet20", "--device", "foo"], "unknown device"),
    (["explain", "/nonexistent"], "does not exist"),
    (["explain", "/nonexistent", "--samples", "0"], "must be a positive integer"),
    (["explain", "{weights}", "--model", "resnet20", "--images", "/no.png"], "does not exist"),
    (["explain", "{weights}", "--model", "resnet20", "--images", "{file}"], "not an image"),
    (["explain", "{weights}", "--model", "resnet20", "--images", "{empty}"], "no image files"),
    (["explain", "{weights}", "--model", "resnet20", "--box", "9", "9", "5", "5"], "box"),
    (["explain", "{weights}", "--model", "resnet20", "--layer", "nosuch"], "no layer"),
    (["explain", "{weights}", "--model", "resnet20", "--offset", "99999"], "outside"),
    (["export", "--model", "resnet99"], "unknown model"),
    (["export", "--model", "resnet20", "--input-size", "0"], "must be a positive integer"),
    (["export", "--model", "resnet20", "--opset", "3"], "opset must be an integer from 18"),
    (["export", "/nonexistent"], "does not exist"),
    (["export", "--model", "resnet20", "--output", "{file}/m.onnx"], "is a file, not a folder"),
    (["explain", "{weights}", "--model", "resnet20", "--output", "{file}"], "is a file"),
    (["detect", "train", "--output", "{file}"], "is a file, not a folder"),
    (["export", "{junk}", "--model", "resnet20"], "{junk}"),
    (["attach-report", "nosuch"], "unknown model"),
    (["attach-report", "torchvision:nosuch"], "unknown torchvision model"),
    (["attach-report", "resnet20", "--num-classes", "0"], "must be a positive integer"),
    (["info", "--models", "nosuch"], "unknown model"),
    (["info", "--format", "xml"], "invalid choice"),
    # bench
    (["bench", "--model", "resnet99", "--quick"], "unknown model"),
    pytest.param(["bench", "--device", "cuda", "--quick"], "no usable CUDA", marks=NO_CUDA),
    (["bench", "--batch-size", "0"], "must be a positive integer"),
    (["bench", "--threads", "0"], "must be a positive integer"),
    (["bench", "--quick", "--json", "/nonexistent/b.json"], "does not exist"),
    # detection
    (["detect", "train", "--model", "nosuch"], "unknown torchvision detector"),
    (["detect", "train", "--backbone", "resnet99"], "unknown detection backbone"),
    pytest.param(["detect", "train", "--device", "cuda"], "no usable CUDA", marks=NO_CUDA),
    (["detect", "train", "--set", "lr=[1"], "not a YAML value"),
    (["detect", "train", "--lr", "nan"], "lr takes a finite number"),
    (["detect", "train", "--dataset", "coco", "--data-dir", "/nonexistent"], "not found"),
    (["detect", "eval", "/nonexistent"], "does not exist"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Damaged inputs, outside the folder the commands run in."""
    root = tmp_path_factory.mktemp("bad-inputs")
    bad = root / "fashion"
    bad.mkdir()
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")  # fmt: skip
    for name in names:  # gzip files cut short
        (bad / f"{name}.gz").write_bytes(gzip.compress(b"\0" * 4096)[:40])
    text = root / "notes.txt"
    text.write_text("not a config, a run folder or weights\n")
    junk = root / "weights.safetensors"
    junk.write_bytes(b"\x12\x00\x00\x00\x00\x00\x00\x00{not json at all")
    weights = root / "resnet20.safetensors"  # a Fashion-MNIST ResNet-20 + CBAM, untrained
    model = create_model("resnet20", num_classes=10, in_chans=1, small_input=True)
    save_file(model.state_dict(), weights)
    empty = root / "empty"
    empty.mkdir()
    return {"{bad}": str(bad), "{file}": str(text), "{junk}": str(junk),
            "{weights}": str(weights), "{empty}": str(empty)}  # fmt: skip


def argv_of(case: tuple | object) -> list[str]:
    return case[0] if isinstance(case, tuple) and not hasattr(case, "marks") else case.values[0]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(argv_of(c)) for c in CASES])
def test_a_mistake_gets_one_line_and_changes_nothing(
    argv, words, inputs, tmp_path, monkeypatch, capsys
):
    for placeholder, value in inputs.items():
        argv = [a.replace(placeholder, value) for a in argv]
        words = words.replace(placeholder, value)
    assert not any("{" in a for a in argv if not a.startswith("attention_kwargs")), argv
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cbam") and ": error: " in lines[0], lines[0]
    assert words in lines[0], lines[0]
    assert out == "", out
    assert list(tmp_path.iterdir()) == []


def test_the_table_covers_every_subcommand():
    from cbam.cli import COMMANDS

    named = {argv_of(c)[0] for c in CASES if argv_of(c)}
    for command in COMMANDS:
        name = command.__name__.rsplit(".", 1)[-1].rstrip("_").replace("_", "-")
        assert name in named, f"no bad-input case for `cbam {name}`"


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    """Only the user's mistakes (ValueError) are one line: a bug must still show where."""
    from cbam.cli import info

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "cmd_info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])
