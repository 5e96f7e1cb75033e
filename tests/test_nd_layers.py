"""CBAM, its two gates, SE and BAM on 1-D signals and 3-D volumes (`spatial_dims`): each
against the paper's equations written out here with random weights, float64 gradients
against finite differences, ONNX with a dynamic batch in onnxruntime, torch.compile with no
graph break; and 2-D unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cbam import CBAM, create_model
from cbam.bench.kernel_checks import randomise
from cbam.layers import BAM, SE, ChannelAttention, SpatialAttention

DIMS = [1, 2, 3]
SHAPES = {1: (3, 16, 11), 2: (3, 16, 7, 6), 3: (3, 16, 5, 4, 6)}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def spatial_axes(x):
    return list(range(2, x.dim()))


def pool(x, kind):
    axes = spatial_axes(x)
    if kind == "avg":
        return x.mean(axes)
    if kind == "max":
        return x.amax(axes)
    if kind == "lp":
        return x.pow(2).sum(axes).sqrt()
    return x.flatten(2).logsumexp(2)  # lse


def batch_norm(s, bn, train):
    """BatchNorm(1 channel) by hand: batch statistics in training, running ones in eval."""
    if train:
        mean, var = s.mean(), s.var(unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (s - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def channel_gate(x, layer):
    """Mc = sigmoid(sum over pools of W2 relu(W1 p + b1) + b2), one shared MLP."""
    fc1, fc2 = layer.mlp[0], layer.mlp[2]
    logits = sum(
        F.linear(torch.relu(F.linear(pool(x, kind), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        for kind in layer.pool_types
    )
    return torch.sigmoid(logits).view(*logits.shape, *[1] * (x.dim() - 2))


def spatial_gate(x, layer, train):
    """Ms = sigmoid(BN(conv_k([max over C, mean over C]))), or a 1x1 conv compression."""
    if layer.method == "pool":
        compressed = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    else:
        compressed = CONV[x.dim() - 2](x, layer.compress.weight)
    s = CONV[x.dim() - 2](compressed, layer.conv.weight, padding=layer.conv.kernel_size[0] // 2)
    return torch.sigmoid(batch_norm(s, layer.bn, train))


def cbam_by_hand(x, m, train):
    if m.spatial is None:
        return x * channel_gate(x, m.channel)
    if m.order == "channel_spatial":
        u = x * channel_gate(x, m.channel)
        return u * spatial_gate(u, m.spatial, train)
    if m.order == "spatial_channel":
        u = x * spatial_gate(x, m.spatial, train)
        return u * channel_gate(u, m.channel)
    return x * channel_gate(x, m.channel) * spatial_gate(x, m.spatial, train)


VARIANTS = [
    {},
    {"pool_types": ("avg", "max", "lp", "lse")},
    {"spatial": "conv1x1", "kernel_size": 3},
    {"order": "spatial_channel"},
    {"order": "parallel"},
    {"spatial": None},
    {"kernel_size": 3, "reduction": 4},
]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cbam_is_the_papers_equations(dims, variant, train):
    m = randomise(CBAM(16, spatial_dims=dims, **variant)).train(train)
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    expected = cbam_by_hand(x, copy.deepcopy(m).double(), train)
    actual = m.double()(x)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", DIMS)
def test_the_gates_se_and_bam_are_their_equations(dims):
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    channel = randomise(ChannelAttention(16, 4, ("avg", "max"), spatial_dims=dims)).double()
    torch.testing.assert_close(channel(x), x * channel_gate(x, channel))
    spatial = randomise(SpatialAttention(16, 5, spatial_dims=dims)).double().eval()
    torch.testing.assert_close(spatial(x), x * spatial_gate(x, spatial, False))
    se = randomise(SE(16, 4, spatial_dims=dims)).double()
    fc1, fc2 = se.mlp[0], se.mlp[2]
    squeeze = torch.relu(F.linear(pool(x, "avg"), fc1.weight, fc1.bias))
    excite = torch.sigmoid(F.linear(squeeze, fc2.weight, fc2.bias))
    torch.testing.assert_close(se(x), x * excite.view(*excite.shape, *[1] * dims))
    bam = randomise(BAM(16, 4, spatial_dims=dims)).double().eval()
    linear1, bn1, _, linear2 = bam.channel_mlp
    hidden = F.batch_norm(
        F.linear(pool(x, "avg"), linear1.weight, linear1.bias),
        bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, False, 0.0, bn1.eps,
    )  # fmt: skip
    mc = F.linear(torch.relu(hidden), linear2.weight, linear2.bias).view(*hidden.shape[:1], 16,
                                                                       *[1] * dims)  # fmt: skip
    ms = x
    for layer in bam.spatial:  # its convs are dims-D, its BatchNorms dims-D: run them in turn
        ms = layer(ms)
    torch.testing.assert_close(bam(x), x * (1 + torch.sigmoid(mc + ms)))
    assert all(type(c).__name__.endswith(f"{dims}d") for c in bam.spatial if c._parameters)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("layer", ["cbam", "cbam-parallel", "se", "bam"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float64_gradients_match_finite_differences(dims, layer, train):
    torch.manual_seed(0)
    build = {
        "cbam": lambda: CBAM(4, reduction=2, kernel_size=3, spatial_dims=dims),
        "cbam-parallel": lambda: CBAM(4, 2, order="parallel", kernel_size=3, spatial_dims=dims),
        "se": lambda: SE(4, 2, spatial_dims=dims),
        "bam": lambda: BAM(4, 2, dilation=1, spatial_dims=dims),
    }[layer]
    m = randomise(build()).double().train(train)
    shape = (2, 4) + {1: (5,), 2: (3, 4), 3: (2, 3, 3)}[dims]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if train:  # BatchNorm's running statistics move on every call: compare on a copy each time

        def f(inp):
            return copy.deepcopy(m)(inp)
    else:
        f = m
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dims", DIMS)
def test_two_d_default_is_unchanged(dims):
    """spatial_dims=2 is the default and builds the same module as before it existed."""
    torch.manual_seed(0)
    default = CBAM(16)
    torch.manual_seed(0)
    explicit = CBAM(16, spatial_dims=2)
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert repr(default) == repr(explicit)
    names = CBAM(16, spatial_dims=dims).state_dict().keys()
    assert list(names) == list(default.state_dict())  # same keys in every dimensionality


@pytest.mark.parametrize("dims", [1, 3])
def test_other_dims_run_the_reference_path_and_refuse_fused(dims):
    m = CBAM(16, spatial_dims=dims)
    assert not m.fused_supported
    with pytest.raises(ValueError, match="its kernels are 2-D"):
        CBAM(16, spatial_dims=dims, impl="fused")
    with pytest.raises(ValueError, match="spatial_dims=2"):  # a 2-D map: the error says so
        m(torch.randn(SHAPES[2]))


@pytest.mark.parametrize("value", [0, 4, True, "3"])
def test_bad_spatial_dims_is_a_value_error(value):
    with pytest.raises(ValueError, match="spatial_dims must be 1"):
        CBAM(16, spatial_dims=value)


@pytest.mark.parametrize("dims", [1, 3])
def test_compile_has_no_graph_break(dims):
    torch._dynamo.reset()
    m = randomise(CBAM(16, spatial_dims=dims)).train()
    x = torch.randn(SHAPES[dims], requires_grad=True)
    compiled = torch.compile(copy.deepcopy(m), fullgraph=True)  # a graph break is an error
    out = compiled(x)
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)
    grad = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(m(x).sum(), x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_onnx_with_a_dynamic_batch(dims, tmp_path):
    pytest.importorskip("onnxruntime")
    from cbam.interop.export import export_model, onnx_batch_axis, verify_export

    model = torch.nn.Sequential(
        {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[dims](3, 16, 3, padding=1),
        randomise(CBAM(16, spatial_dims=dims)).eval(),
    ).eval()
    size = SHAPES[dims][2:]
    path = export_model(model, tmp_path / "nd.onnx", input_size=size, in_chans=3)
    assert onnx_batch_axis(path) == "batch"
    diffs = verify_export(model, path, batch_sizes=(1, 4), input_size=size, in_chans=3)
    assert max(diffs.values()) < 1e-4, diffs


def test_two_d_models_are_untouched():
    """The registry's models still build 2-D attention by default."""
    model = create_model("resnet20", attention="cbam")
    layers = [m for m in model.modules() if isinstance(m, CBAM)]
    assert layers and all(m.spatial_dims == 2 and m.fused_supported for m in layers)
