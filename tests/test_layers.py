import math

import pytest
import torch
import torch.nn.functional as F

from cbam import BAM, CBAM, SE, ChannelAttention, SpatialAttention, create_attention
from cbam.bench.kernel_checks import randomise
from cbam.layers import ORDERS, POOL_TYPES, global_pool

POOL_SUBSETS = [
    ("avg",), ("max",), ("lp",), ("lse",), ("avg", "max"), ("max", "lse"), POOL_TYPES,
]  # fmt: skip


def reference_cbam(x: torch.Tensor, m: CBAM) -> torch.Tensor:
    """CBAM written out from the paper's equations and REFERENCE.md section 1, in eval mode."""
    mlp = m.channel.mlp
    w1, b1, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias

    def shared_mlp(v: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)

    avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    mc = torch.sigmoid(shared_mlp(avg) + shared_mlp(mx))[:, :, None, None]
    f1 = mc * x
    pooled = torch.cat([f1.max(dim=1, keepdim=True).values, f1.mean(dim=1, keepdim=True)], 1)
    bn = m.spatial.bn
    s = F.conv2d(pooled, m.spatial.conv.weight, padding=3)
    s = (s - bn.running_mean.view(1, 1, 1, 1)) / torch.sqrt(bn.running_var.view(1, 1, 1, 1) + 1e-5)
    ms = torch.sigmoid(s * bn.weight.view(1, 1, 1, 1) + bn.bias.view(1, 1, 1, 1))
    return ms * f1


def test_default_cbam_equals_the_papers_equations():
    m = randomise(CBAM(32)).eval()
    x = torch.randn(3, 32, 9, 11)
    torch.testing.assert_close(m(x), reference_cbam(x, m), rtol=1e-5, atol=1e-6)


def test_default_cbam_has_the_authors_structure_and_init():
    m = CBAM(64)
    fc1, fc2 = m.channel.mlp[0], m.channel.mlp[2]
    assert (fc1.in_features, fc1.out_features, fc2.out_features) == (64, 4, 64)
    assert fc1.bias is not None and fc2.bias is not None
    assert torch.all(fc1.bias == 0) and torch.all(fc2.bias == 0)
    conv, bn = m.spatial.conv, m.spatial.bn
    assert conv.bias is None and tuple(conv.weight.shape) == (1, 2, 7, 7) and conv.padding == (3, 3)
    assert (bn.eps, bn.momentum, bn.affine) == (1e-5, 0.01, True)
    assert torch.all(bn.weight == 0) and torch.all(bn.bias == 0)
    # A fresh spatial gate is sigmoid(0) = 0.5 everywhere, in training and in eval mode.
    x = torch.randn(2, 64, 5, 5)
    for mode in (m.train, m.eval):
        mode()
        torch.testing.assert_close(m.spatial.gate(x).detach(), torch.full((2, 1, 5, 5), 0.5))


def test_channel_pool_is_max_then_mean():
    from cbam.layers import ChannelPool

    x = torch.randn(2, 5, 3, 3)
    out = ChannelPool()(x)
    torch.testing.assert_close(out[:, 0], x.amax(1))
    torch.testing.assert_close(out[:, 1], x.mean(1))


def _variants():
    for pools in POOL_SUBSETS:
        yield {"pool_types": pools}
    for spatial in ("pool", "conv1x1", None):
        for k in (3, 7):
            yield {"spatial": spatial, "kernel_size": k}
    for order in ORDERS:
        yield {"order": order}
    yield {"kernel_size": 5, "reduction": 4}


@pytest.mark.parametrize("kwargs", list(_variants()), ids=str)
def test_cbam_variants_shapes_and_gradients(kwargs):
    m = CBAM(32, **kwargs)
    x = torch.randn(2, 32, 7, 6, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "layer",
    [
        ChannelAttention(24, 8, ("avg", "lp")),
        SpatialAttention(24, 3),
        SpatialAttention(24, 7, method="conv1x1"),
        SE(24, 8),
        BAM(24, 8),
    ],
    ids=lambda m: type(m).__name__,
)
def test_other_layers_shapes_and_gradients(layer):
    x = torch.randn(3, 24, 8, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("pool", POOL_TYPES)
def test_global_pools_compute_what_their_names_say(pool):
    x = torch.randn(2, 3, 4, 5)
    flat = x.flatten(2)
    expected = {
        "avg": flat.mean(-1),
        "max": flat.max(-1).values,
        "lp": flat.pow(2).sum(-1).sqrt(),
        "lse": flat.exp().sum(-1).log(),
    }[pool]
    torch.testing.assert_close(global_pool(x, pool), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lse_and_lp_pools_stay_finite_on_large_low_precision_inputs(dtype):
    x = (torch.rand(2, 16, 14, 14) * 2000 + 1000).to(dtype)  # exp(1000) overflows any float
    for pool in ("lse", "lp"):
        out = global_pool(x, pool)
        assert out.dtype == dtype and torch.isfinite(out).all(), pool
    lse = global_pool(x, "lse").float()
    assert torch.all(lse >= x.float().amax(dim=(2, 3)) - 8)  # lse >= max, within bf16 rounding
    m = CBAM(16, pool_types=("lse",)).to(dtype)
    assert torch.isfinite(m(x)).all()


def test_spatial_none_leaves_spatial_structure_untouched():
    m = randomise(CBAM(16, spatial=None)).eval()
    x = torch.randn(2, 16, 6, 6)
    ratio = m(x) / x  # every position of a channel is scaled by the same gate value
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert m.spatial is None


def test_channel_attention_scales_channels_and_spatial_attention_scales_positions():
    x = torch.randn(2, 8, 5, 5)
    ca = randomise(ChannelAttention(8, 2))
    ratio = ca(x) / x
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    sa = randomise(SpatialAttention(8)).eval()
    ratio = sa(x) / x
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert not torch.allclose(ratio[:, :, 0, 0], ratio[:, :, 2, 3])


def test_orders_give_different_outputs():
    x = torch.randn(2, 16, 6, 6)
    outs = {}
    for order in ORDERS:
        outs[order] = randomise(CBAM(16, order=order)).eval()(x)  # same seed: same weights
    m = randomise(CBAM(16)).eval()
    expected_parallel = x * m.channel.gate(x) * m.spatial.gate(x)
    torch.testing.assert_close(outs["parallel"], expected_parallel)
    expected_sc = (lambda f: f * m.channel.gate(f))(x * m.spatial.gate(x))
    torch.testing.assert_close(outs["spatial_channel"], expected_sc)
    for a, b in [("channel_spatial", "parallel"), ("channel_spatial", "spatial_channel")]:
        assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_conv1x1_spatial_learns_the_compression():
    m = CBAM(16, spatial="conv1x1", kernel_size=3)
    assert tuple(m.spatial.compress.weight.shape) == (1, 16, 1, 1)
    assert tuple(m.spatial.conv.weight.shape) == (1, 1, 3, 3)


def test_se_is_average_pooled_channel_attention():
    se = randomise(SE(16, 4))
    ca = randomise(ChannelAttention(16, 4, pool_types=("avg",)))
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(se(x), ca(x))
    expected = torch.sigmoid(se.mlp(x.mean((2, 3))))[:, :, None, None] * x
    torch.testing.assert_close(se(x), expected)


def test_bam_combines_branches_in_parallel_with_a_residual_gate():
    m = randomise(BAM(32, 4)).eval()
    x = torch.randn(2, 32, 9, 9)
    mc = m.channel_mlp(x.mean((2, 3)))[:, :, None, None]
    ms = m.spatial(x)
    assert ms.shape == (2, 1, 9, 9)
    torch.testing.assert_close(m(x), x * (1 + torch.sigmoid(mc + ms)))
    dilated = [c for c in m.spatial if isinstance(c, torch.nn.Conv2d) and c.dilation == (4, 4)]
    assert len(dilated) == 2


def test_gate_hooks_see_the_gate_values():
    m = CBAM(16).eval()
    seen = {}
    m.channel.sigmoid.register_forward_hook(lambda mod, i, o: seen.setdefault("channel", o))
    m.spatial.sigmoid.register_forward_hook(lambda mod, i, o: seen.setdefault("spatial", o))
    m(torch.randn(2, 16, 6, 6))
    assert seen["channel"].shape == (2, 16) and seen["spatial"].shape == (2, 1, 6, 6)
    assert ((seen["spatial"] > 0) & (seen["spatial"] < 1)).all()


def test_create_attention_by_name():
    assert isinstance(create_attention("cbam", 32, kernel_size=3), CBAM)
    assert isinstance(create_attention("se", 32), SE)
    assert create_attention(None, 32) is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CBAM(32, pool_types=("avg", "median")), "unknown pool type 'median'"),
        (lambda: CBAM(32, pool_types=()), "at least one"),
        (lambda: CBAM(32, pool_types=("avg", "avg")), "twice"),
        (lambda: CBAM(32, order="channel_then_spatial"), "unknown order"),
        (lambda: CBAM(32, spatial="conv3x3"), "unknown spatial method"),
        (lambda: CBAM(32, spatial=None, order="parallel"), "needs spatial attention"),
        (lambda: CBAM(32, kernel_size=4), "kernel_size must be odd"),
        (lambda: CBAM(32, kernel_size=0), "positive odd"),
        (lambda: CBAM(8, reduction=16), "reduction=16 is larger than channels=8"),
        (lambda: SE(8, reduction=0), "reduction must be a positive integer"),
        (lambda: BAM(0), "channels must be a positive integer"),
        (lambda: create_attention("cbma", 8), "did you mean 'cbam'"),
    ],
)
def test_bad_construction_is_a_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("layer", [CBAM(16), SE(16), BAM(16), SpatialAttention(16)])
def test_bad_input_names_expected_and_actual(layer):
    with pytest.raises(ValueError, match=r"built for 16 channels but the input has 12"):
        layer(torch.randn(2, 12, 5, 5))
    with pytest.raises(ValueError, match=r"4-D .* got 3-D"):
        layer(torch.randn(16, 5, 5))


def test_deterministic_mode_runs_forward_and_backward():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            m = CBAM(32, pool_types=POOL_TYPES)
            x = torch.randn(2, 32, 8, 8, requires_grad=True)
            m(x).sum().backward()
            grads.append(x.grad)
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"spatial": None}, {"spatial": "conv1x1", "order": "parallel", "pool_types": POOL_TYPES}],
    ids=str,
)
def test_torchscript_matches_eager(kwargs):
    m = randomise(CBAM(16, **kwargs)).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(scripted(x), m(x))
    with pytest.raises(Exception, match="built for 16 channels"):
        scripted(torch.randn(2, 3, 5, 7))


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    m = randomise(CBAM(32)).train()
    x = torch.randn(4, 32, 10, 10, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out_c = compiled(x)
    grad_c = torch.autograd.grad(out_c.sum(), x)[0]
    m2 = randomise(CBAM(32)).train()
    out_e = m2(x)
    grad_e = torch.autograd.grad(out_e.sum(), x)[0]
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-5)
    assert math.isfinite(out_c.sum().item())
