"""Export to ONNX and TorchScript, checked in onnxruntime / after reloading; `cbam export`."""

import argparse

import onnx
import pytest
import torch

from cbam import create_model, export_model, verify_export
from cbam.cli import export as export_cli
from cbam.cli import main
from cbam.interop import onnx_batch_axis, onnx_op_types

SIZE = 64


@pytest.fixture(scope="module")
def resnet18_cbam():
    torch.manual_seed(0)
    model = create_model("resnet18", attention="cbam", num_classes=10).eval()
    with torch.no_grad():  # gates away from their init, so the attention really shapes outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=["dynamo", "torchscript-based"])
def onnx_file(request, resnet18_cbam, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "resnet18_cbam.onnx"
    dynamo = request.param == "dynamo"
    return export_model(resnet18_cbam, path, "onnx", input_size=SIZE, dynamo=dynamo)


def test_onnx_matches_pytorch_at_batch_1_and_3(resnet18_cbam, onnx_file):
    diffs = verify_export(resnet18_cbam, onnx_file, batch_sizes=(1, 3), input_size=SIZE)
    assert set(diffs) == {1, 3}
    assert max(diffs.values()) < 1e-4, diffs


def test_onnx_has_a_dynamic_batch_axis(onnx_file):
    assert onnx_batch_axis(onnx_file) == "batch"
    graph = onnx.load(str(onnx_file)).graph
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not 1 or 2


def test_onnx_attention_pools_with_reductions_not_maxpool(onnx_file):
    in_attention = onnx_op_types(onnx_file, "attention")
    assert in_attention["ReduceMax"] == 16  # 8 blocks x (global max + channel max)
    assert in_attention["ReduceMean"] == 16  # 8 blocks x (global avg + channel mean)
    assert in_attention["MaxPool"] == 0 and in_attention["GlobalMaxPool"] == 0
    assert onnx_op_types(onnx_file)["MaxPool"] == 1  # only the stem's 3x3 max-pool


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_round_trip(resnet18_cbam, tmp_path):
    path = export_model(resnet18_cbam, tmp_path / "m.pt", "torchscript", input_size=SIZE)
    diffs = verify_export(resnet18_cbam, path, batch_sizes=(1, 3), input_size=SIZE)
    assert max(diffs.values()) < 1e-4, diffs
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 3, SIZE, SIZE)
    for _ in range(3):  # the profiling executor re-optimises on later calls
        torch.testing.assert_close(loaded(x), resnet18_cbam(x), rtol=1e-4, atol=1e-4)


def test_export_keeps_training_mode_and_rejects_unknown_format(resnet18_cbam, tmp_path):
    model = create_model("resnet20", attention="cbam").train()
    export_model(model, tmp_path / "m.onnx", input_size=32, dynamo=False)
    assert model.training
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.tflite", "tflite")


def run_cli(argv):
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_export_onnx(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    argv = ["export", "--model", "resnet20", "--output", str(out), "--legacy-exporter"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert out.exists()
    assert "batch axis: 'batch'" in printed
    assert "attention layers: ReduceMax x18, ReduceMean x18" in printed  # 9 blocks
    assert "batch 1: max |onnxruntime - PyTorch|" in printed
    assert "batch 3: max |onnxruntime - PyTorch|" in printed


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_cli_export_torchscript_with_checkpoint(tmp_path, capsys):
    source = create_model("resnet20", attention="cbam", num_classes=7)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    out = tmp_path / "r20.pt"
    argv = [
        "export", "--model", "resnet20", "--num-classes", "7", "--format", "torchscript",
        "--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(out),
    ]  # fmt: skip
    assert run_cli(argv) == 0
    loaded = torch.jit.load(str(out))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source.eval()(x), rtol=1e-4, atol=1e-4)
    assert "max |torch.jit.load - PyTorch|" in capsys.readouterr().out


def test_cli_export_bad_checkpoint_is_an_error(tmp_path):
    (tmp_path / "bad.pth").write_text("not weights")
    argv = ["export", "--model", "resnet20", "--checkpoint", str(tmp_path / "bad.pth")]
    with pytest.raises(ValueError, match="is not a checkpoint"):
        run_cli([*argv, "--output", str(tmp_path / "x.onnx")])
    assert not (tmp_path / "x.onnx").exists()


def write_attached_run(run_dir, seed=0):
    """A run folder as `cbam train --model torchvision:mobilenet_v3_small --attach cbam`
    leaves it: config.yaml and best.safetensors (random weights, alpha moved off 0)."""
    import dataclasses
    from types import SimpleNamespace

    from cbam.training.checkpoint import save_weights
    from cbam.training.config import TrainConfig, save_config
    from cbam.training.trainer import build_model

    config = TrainConfig(model="torchvision:mobilenet_v3_small", attach="cbam").validate()
    run_dir.mkdir()
    # The run started from a weights file that has gone since: export needs only the run's.
    gone = dataclasses.replace(config, pretrained=str(run_dir / "moved.safetensors"))
    save_config(gone, run_dir / "config.yaml")
    torch.manual_seed(seed)
    model = build_model(config, SimpleNamespace(num_classes=10, in_chans=1, image_size=28))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.5)
    save_weights(model, run_dir / "best.safetensors")
    return model.eval()


def test_cli_export_takes_a_run_folder_of_an_attached_torchvision_model(tmp_path, capsys):
    model = write_attached_run(tmp_path / "run")
    out = tmp_path / "mnv3.onnx"
    assert run_cli(["export", str(tmp_path / "run"), "--output", str(out),
                    "--legacy-exporter"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "batch 3: max |onnxruntime - PyTorch|" in printed
    assert "attention layers: ReduceMax x12, ReduceMean x12" in printed  # 6 CBAMs
    diffs = verify_export(model, out, batch_sizes=(2,), input_size=28, in_chans=1)
    assert diffs[2] < 1e-4  # the file holds the run's weights, not a fresh model's


def test_cli_export_torchvision_model_by_name(tmp_path, capsys):
    out = tmp_path / "r18.onnx"
    argv = ["export", "--model", "torchvision:resnet18", "--attach", "cbam", "--num-classes",
            "10", "--input-size", "64", "--output", str(out), "--legacy-exporter"]  # fmt: skip
    assert run_cli(argv) == 0
    assert "attention layers: ReduceMax x16" in capsys.readouterr().out


def test_attached_segmenter_exports_and_a_detector_is_refused(tmp_path, capsys):
    """Segmenters export their "out" map, checked in onnxruntime; detectors (a list of images
    in, boxes out) get one clear line, not an exporter traceback."""
    out = tmp_path / "seg.onnx"
    args = ["export", "--model", "torchvision:lraspp_mobilenet_v3_large", "--attach", "cbam",
            "--num-classes", "3", "--input-size", "64", "--legacy-exporter", "--output",
            str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pooling ops, attention layers: ReduceMax x20, ReduceMean x20" in printed
    assert "batch 3: max |onnxruntime - PyTorch|" in printed
    assert main(["export", "--model", "torchvision:keypointrcnn_resnet50_fpn", "--output",
                 str(tmp_path / "kp.onnx")]) == 2  # fmt: skip
    assert "KeypointRCNN is a detector (roi_heads)" in capsys.readouterr().err
    assert not (tmp_path / "kp.onnx").exists()
