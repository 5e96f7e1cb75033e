"""Inputs at the edges, for every attention layer and model: empty batches flow through (empty
output, empty and zero gradients), 0-size maps are a ValueError (never a crash), and NaN / Inf
propagate as in the reference. Drawn shapes, strides and dtypes: test_fuzz_fused.py."""

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam import kernels
from cbam.layers import create_attention
from cbam.models._registry import model_entry

ATTENTIONS = ["cbam", "se", "bam", "channel", "spatial"]
CBAM_VARIANTS = [
    {},
    {"spatial": None},
    {"order": "parallel", "spatial": "conv1x1"},
    {"pool_types": ("avg", "lse"), "order": "spatial_channel"},
]


def layers() -> list[tuple[str, nn.Module]]:
    built = [(name, create_attention(name, 32)) for name in ATTENTIONS]
    built += [(f"cbam{variant}", cbam.CBAM(32, **variant)) for variant in CBAM_VARIANTS]
    return built


FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.mark.parametrize("name, layer", layers(), ids=[n for n, _ in layers()])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_empty_batch_flows_through(name, layer, train, fmt):
    layer.train(train)
    x = torch.randn(0, 32, 7, 5).contiguous(memory_format=fmt).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for param_name, param in layer.named_parameters():
        assert param.grad is None or not param.grad.any(), param_name


@pytest.mark.parametrize("name, layer", layers(), ids=[n for n, _ in layers()])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 32, 0, 0), (2, 32, 1, 0), (0, 32, 0, 4)])
def test_zero_size_map_is_a_value_error(name, layer, train, shape):
    """Not a SIGFPE: before this check the CPU kernel divided by H x W and killed the
    process (exit 136) on CBAM(64)(torch.randn(2, 64, 0, 0))."""
    layer.train(train)
    with pytest.raises(ValueError, match="at least 1 x 1"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("shape", [(0, 16, 4, 4), (2, 16, 0, 3)])
def test_kernels_refuse_an_empty_map(shape):
    layer = cbam.CBAM(16)
    with pytest.raises(ValueError, match="non-empty map"):
        kernels.forward(torch.randn(shape), layer._fused_params())
    with pytest.raises(ValueError, match="non-empty map"):
        kernels.block_tail(
            torch.randn(shape), nn.BatchNorm2d(16), torch.randn(shape), layer._fused_params()
        )


def test_every_model_takes_an_empty_batch():
    """As torchvision's ResNet does: (0, classes) out, in training and in eval."""
    for name in cbam.list_models():
        for attention in ("cbam", "se"):
            model = cbam.create_model(name, attention=attention, num_classes=10)
            size = min(model_entry(name).input_size, 64)
            for train in (True, False):
                x = torch.randn(0, 3, size, size, requires_grad=True)
                y = model.train(train)(x)
                assert y.shape == (0, 10), (name, attention, train)
                y.sum().backward()
                assert x.grad.shape == x.shape


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("path", ["kernels", "aten"])
def test_nan_and_inf_propagate_as_in_the_reference(value, train, path):
    torch.manual_seed(0)
    layer = cbam.CBAM(32, reduction=4).train(train)
    with torch.no_grad():
        layer.spatial.bn.weight.fill_(0.5)  # a gate that depends on the map
    reference = copy.deepcopy(layer)
    reference.impl = "reference"
    x = torch.randn(2, 32, 5, 6)
    x[0, 3, 2, 2] = value
    expected = reference(x.clone())
    if path == "aten":
        with kernels.disabled():
            actual = layer(x.clone())
    else:
        actual = layer(x.clone())
    assert expected.isnan().any()  # the value reached the output: the check is not vacuous
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_attached_torchvision_models_take_an_empty_batch(name):
    torchvision = pytest.importorskip("torchvision")
    model = cbam.attach(getattr(torchvision.models, name)(num_classes=10), "cbam")
    for train in (True, False):
        x = torch.randn(0, 3, 64, 64, requires_grad=True)
        y = model.train(train)(x)
        assert y.shape == (0, 10)
        y.sum().backward()
        assert x.grad.shape == x.shape
