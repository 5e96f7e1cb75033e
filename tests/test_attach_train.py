"""`cbam train --model torchvision:NAME --attach cbam --pretrained FILE`, and `cbam
attach-report`."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from cbam.cli import main
from cbam.training import load_config, train
from cbam.training.eval_run import load_run


def pretrained_file(tmp_path):
    """Weights of the network as published (ImageNet head), saved locally: no hub here."""
    torch.manual_seed(0)
    plain = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mobilenet_v3_small.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    return path


def test_train_attached_torchvision_model_from_local_weights(tmp_path, image_tree):
    image_tree(tmp_path / "images", per_class=6)
    weights = pretrained_file(tmp_path)
    config = load_config("small", {
        "model": "torchvision:mobilenet_v3_small", "attach": "cbam", "pretrained": str(weights),
        "dataset": "imagefolder", "data_dir": str(tmp_path / "images"), "image_size": 32,
        "epochs": 1, "batch_size": 4, "output": str(tmp_path / "run"),
    })  # fmt: skip
    result = train(config)
    saved = load_file(str(result.run_dir / "best.safetensors"))
    start = load_file(str(weights))
    attention = [k for k in saved if ".attention." in k]
    assert len([k for k in attention if k.endswith("alpha")]) == 6
    assert any(saved[k].abs().max() > 0 for k in attention if k.endswith("alpha"))  # it trained
    # The backbone kept the published names (minus the new 2-class head).
    assert {k for k in start if not k.startswith("classifier.3")} <= set(saved)
    run = load_run(result.run_dir)
    assert run.model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_grey_images_adapt_the_first_conv_by_summing_rgb():
    from cbam.interop.external import adapt_first_conv

    model = torchvision.models.mobilenet_v3_small().eval()
    grey = torch.randn(2, 1, 32, 32)
    expected = model(grey.expand(-1, 3, -1, -1))
    adapt_first_conv(model, 1)
    torch.testing.assert_close(model(grey), expected, rtol=1e-4, atol=1e-5)


def test_attach_options_need_an_external_model(tmp_path):
    with pytest.raises(ValueError, match="attach and pretrained are for torchvision:NAME"):
        load_config("small", {"model": "resnet20", "attach": "cbam"})
    with pytest.raises(ValueError, match="unknown attach_placement 'stages'"):
        load_config("small", {"model": "timm:resnet18", "attach_placement": "stages"})
    from cbam.interop import CheckpointError
    from cbam.interop.external import create_external

    with pytest.raises(CheckpointError, match="not found"):
        create_external("timm:resnet18", 10, pretrained=tmp_path / "x")


def test_attach_report_prints_sites_costs_and_skips(capsys):
    assert main(["attach-report", "torchvision:mobilenet_v3_small", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "6 attention layer(s), placement 'residual'" in out
    assert "  features.3.block         24  residual" in out
    assert "MACs at 64 px" in out
    assert main(["attach-report", "torchvision:squeezenet1_1", "--input-size", "0"]) == 0
    assert "skipped (model): no residual adds: placement 'stage' instead" in (
        capsys.readouterr().out
    )
    assert main(["attach-report", "torchvision:swin_t", "--input-size", "0"]) == 2
    assert "out of scope" in capsys.readouterr().err


def test_bn_momentum_override_for_short_fine_tunes():
    from cbam.interop.external import create_external

    model = create_external("torchvision:mobilenet_v3_small", 10, 1, bn_momentum=0.1)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"bn_momentum must be in \(0, 1\]"):
        create_external("torchvision:mobilenet_v3_small", 10, bn_momentum=0)
