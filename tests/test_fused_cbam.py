"""The fused CBAM (kernels/fused_cbam.py) against the reference layer: values, gradients,
running statistics, memory formats, dtypes, gradcheck, torch.compile, and the fallbacks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbam import CBAM, create_model
from cbam.bench.kernel_checks import randomise
from cbam.kernels import native_cbam
from cbam.kernels._argmax import max_over_channels, max_over_hw
from cbam.layers.cbam import set_cbam_impl
from cbam.models.resnet import BasicBlock, Bottleneck

FUSED_VARIANTS = [
    {},
    {"pool_types": ("avg",)},
    {"pool_types": ("max",)},
    {"pool_types": ("max", "avg")},
    {"spatial": None},
    {"spatial": "conv1x1", "kernel_size": 3},
    {"order": "parallel"},
    {"order": "parallel", "spatial": "conv1x1", "pool_types": ("max",)},
    {"kernel_size": 5, "reduction": 4},
]
FORMATS = [torch.contiguous_format, torch.channels_last]


def fused_pair(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(reference, fused) copies of `module` with the same weights."""
    ref, fused = copy.deepcopy(module), copy.deepcopy(module)
    set_cbam_impl(ref, "reference")
    set_cbam_impl(fused, "fused")
    return ref, fused


def assert_scaled_close(actual, expected, tol=1e-5, name=""):
    """max |actual - expected| <= tol * max |expected|: equal to `tol` relative to the tensor's
    own scale (an elementwise rtol is meaningless for entries that cancel to ~0)."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tol * max(scale, 1e-30), f"{name}: max error {error:.3g}, scale {scale:.3g}"


def run(module, x, grad, steps=1):
    """Forward + backward `steps` times; returns the (output, input grad)."""
    xi = x.detach().clone().requires_grad_()
    for _ in range(steps):
        out = module(xi)
        out.backward(grad)
    return out, xi.grad


def run_both(ref, fused, x, grad, steps=1):
    return [run(module, x, grad, steps) for module in (ref, fused)]


def compare_all(ref, fused, x, grad, tol, steps=1):
    (y1, g1), (y2, g2) = run_both(ref, fused, x, grad, steps)
    assert_scaled_close(y2, y1, tol, "output")
    assert_scaled_close(g2, g1, tol, "input grad")
    for (name, p1), p2 in zip(ref.named_parameters(), fused.parameters(), strict=True):
        assert p2.grad is not None, name
        assert_scaled_close(p2.grad, p1.grad, tol, name)
    for (name, b1), b2 in zip(ref.named_buffers(), fused.buffers(), strict=True):
        assert_scaled_close(b2.double(), b1.double(), tol, name)
    return y2


def compare_fp32(module, x, grad, steps=1):
    """fp32 fused and fp32 reference against an fp64 run of the reference: the fused result
    must be within 1e-5 of each tensor's scale, or no further from the fp64 values than the
    fp32 reference is (a scalar gradient that sums hundreds of cancelling terms has an fp32
    rounding error well above 1e-5 of its own size, in the reference as much as here)."""
    ref, fused = fused_pair(module)
    truth = copy.deepcopy(ref).double()
    results = run_both(ref, fused, x, grad, steps)
    (y64, g64), _ = run_both(truth, truth, x.double(), grad.double(), steps)
    tensors = [("output", results[0][0], results[1][0], y64),
               ("input grad", results[0][1], results[1][1], g64)]  # fmt: skip
    for (name, p1), p2, p64 in zip(ref.named_parameters(), fused.parameters(),
                                   truth.parameters(), strict=True):  # fmt: skip
        assert p2.grad is not None, name
        tensors.append((name, p1.grad, p2.grad, p64.grad))
    for (name, b1), b2, b64 in zip(ref.named_buffers(), fused.buffers(), truth.buffers(),
                                   strict=True):  # fmt: skip
        tensors.append((name, b1, b2, b64))
    for name, reference, candidate, exact in tensors:
        exact = exact.double()
        scale = exact.abs().max().item()
        reference_error = (reference.double() - exact).abs().max().item()
        error = (candidate.double() - exact).abs().max().item()
        allowed = max(1e-5 * scale, 4 * reference_error, 1e-12)
        assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g} (scale {scale:.3g})"
    return results[1][0]


@pytest.fixture(params=["kernels", "aten"])
def backend(request, monkeypatch):
    """Runs a test with the compiled CPU kernels (where they apply) and with the ATen path."""
    monkeypatch.setattr(native_cbam, "_enabled", request.param == "kernels")
    if request.param == "kernels":
        assert native_cbam.load() is not None, "the CPU kernels did not build"
    return request.param


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", FUSED_VARIANTS, ids=str)
def test_fused_layer_equals_reference_fp32(kwargs, training, memory_format, backend):
    module = randomise(CBAM(32, **kwargs)).train(training)
    x = torch.randn(3, 32, 9, 11).contiguous(memory_format=memory_format)
    grad = torch.randn(3, 32, 9, 11).contiguous(memory_format=memory_format)
    out = compare_fp32(module, x, grad, steps=2)
    assert out.grad_fn.name() == "FusedCBAMBackward"
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("kwargs", [{}, {"order": "parallel", "spatial": "conv1x1"}], ids=str)
def test_fused_layer_equals_reference_fp64_tightly(kwargs, backend):
    ref, fused = fused_pair(randomise(CBAM(16, **kwargs)).double().train())
    x = torch.randn(2, 16, 28, 28, dtype=torch.float64)  # 784 positions: the two-step argmax
    compare_all(ref, fused, x, torch.randn_like(x), tol=1e-12)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
def test_fused_layer_bf16_close_to_reference(memory_format, backend):
    torch.manual_seed(0)
    module = randomise(CBAM(32)).train()
    ref32, _ = fused_pair(module)
    fused16 = copy.deepcopy(module).to(torch.bfloat16)
    set_cbam_impl(fused16, "fused")
    x = torch.randn(4, 32, 12, 12).contiguous(memory_format=memory_format)
    grad = torch.randn_like(x)
    x32 = x.clone().requires_grad_()
    y32 = ref32(x32)
    y32.backward(grad)
    g32 = x32.grad
    x16 = x.to(torch.bfloat16).requires_grad_()
    y16 = fused16(x16)
    y16.backward(grad.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and y16.grad_fn.name() == "FusedCBAMBackward"
    # bf16 keeps 8 mantissa bits, and ties in a bf16 max are common: compare in norm
    for a, b in [(y16, y32), (x16.grad, g32)]:
        assert ((a.float() - b).norm() / b.norm()).item() < 3e-2
    for p16, p32 in zip(fused16.parameters(), ref32.parameters(), strict=True):
        assert ((p16.grad.float() - p32.grad).norm() / p32.grad.norm()).item() < 5e-2


def test_fused_layer_on_a_non_contiguous_input():
    module = randomise(CBAM(16, reduction=4)).train()
    x = torch.randn(2, 16, 7, 5).transpose(2, 3)  # neither NCHW- nor channels_last-contiguous
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    compare_fp32(module, x, torch.randn(2, 16, 5, 7))


def test_one_value_per_channel_is_the_same_error_as_batch_norms():
    block = Bottleneck(32, 8, attention=CBAM).train()
    x = torch.randn(1, 32, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(x)
    set_cbam_impl(block, "reference")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(x)


def test_gradcheck_layer_fp64(backend):
    module = randomise(CBAM(8, reduction=2)).double().train()
    set_cbam_impl(module, "fused")
    names = [n for n, _ in module.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert fn(x, *params).grad_fn.name() == "FusedCBAMBackward"
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_gradcheck_eval_mode_parallel_conv1x1_fp64():
    module = randomise(CBAM(6, reduction=2, order="parallel", spatial="conv1x1")).double().eval()
    set_cbam_impl(module, "fused")
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5)


def test_fused_is_the_default_and_unsupported_variants_fall_back():
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    assert CBAM(16)(x).grad_fn.name() == "FusedCBAMBackward"
    for kwargs in ({"pool_types": ("avg", "lp")}, {"order": "spatial_channel"}):
        layer = CBAM(16, **kwargs)
        assert layer.impl == "auto" and not layer.fused_supported
        assert layer(x).grad_fn.name() != "FusedCBAMBackward"
    assert CBAM(16, impl="reference")(x).grad_fn.name() != "FusedCBAMBackward"


def test_impl_choices_are_checked():
    with pytest.raises(ValueError, match="impl='fused' cannot compute pool types"):
        CBAM(16, pool_types=("lse",), impl="fused")
    with pytest.raises(ValueError, match="impl='fused' cannot compute order='spatial_channel'"):
        CBAM(16, order="spatial_channel", impl="fused")
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        CBAM(16, impl="fast")
    model = nn.Sequential(CBAM(8, reduction=2), CBAM(8, reduction=2, pool_types=("lp",)))
    assert set_cbam_impl(model, "reference") == 2
    assert all(m.impl == "reference" for m in model)
    with pytest.raises(ValueError, match="impl='fused' cannot compute"):
        set_cbam_impl(model, "fused")
    assert "impl='auto'" in repr(CBAM(8, reduction=2))


def test_gate_hooks_run_the_reference_path_and_see_the_gates():
    module = randomise(CBAM(16)).eval()
    seen = {}
    handle = module.spatial.sigmoid.register_forward_hook(lambda m, i, o: seen.update(s=o))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    out = module(x)
    assert out.grad_fn.name() != "FusedCBAMBackward" and seen["s"].shape == (2, 1, 6, 6)
    handle.remove()
    assert module(x).grad_fn.name() == "FusedCBAMBackward"
    torch.testing.assert_close(module(x), out)
    with torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None):
        assert module(x).grad_fn.name() != "FusedCBAMBackward"  # global hooks count too


def test_tracing_runs_the_reference_path():
    module = randomise(CBAM(16)).eval()
    x = torch.randn(2, 16, 5, 7)
    traced = torch.jit.trace(module, x)
    assert "amax" in str(traced.graph)  # the reference's reductions, not a Python op
    torch.testing.assert_close(traced(x), module(x))


def test_ties_give_the_whole_max_gradient_to_one_element():
    """The one documented difference: with tied maxima the reference splits the max's gradient
    evenly, the fused path gives it to one of them. Both have the same total."""
    module = CBAM(4, reduction=2, spatial=None, pool_types=("max",))
    with torch.no_grad():
        module.channel.mlp[0].weight.fill_(0.3)
        module.channel.mlp[2].weight.fill_(0.2)
    ref, fused = fused_pair(module)
    x = torch.zeros(1, 4, 2, 2)
    x[0, :, 0, 1] = x[0, :, 1, 0] = 1.0  # every channel's max is tied at two positions
    (y1, g1), (y2, g2) = run_both(ref, fused, x, torch.ones(1, 4, 2, 2))
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1.sum((2, 3)), g2.sum((2, 3)))
    assert not torch.allclose(g1, g2)
    assert torch.equal(g1[0, :, 0, 1], g1[0, :, 1, 0])  # the reference splits evenly


# --------------------------------------------------------------------------- in blocks


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", FUSED_VARIANTS[:8], ids=str)
def test_fused_bottleneck_equals_reference(kwargs, training, memory_format, backend):
    torch.manual_seed(0)
    block = Bottleneck(32, 8, attention=lambda c: CBAM(c, **kwargs))
    block = randomise(block).double().train(training).to(memory_format=memory_format)
    ref, fused = fused_pair(block)
    x = torch.randn(3, 32, 6, 7, dtype=torch.float64).contiguous(memory_format=memory_format)
    out = compare_all(ref, fused, x, torch.randn_like(x), tol=1e-10, steps=2)
    assert out.grad_fn.name() == "FusedCBAMBackward"  # the whole tail, BN3 included


@pytest.mark.parametrize(
    "bn",
    [
        nn.BatchNorm2d(16, momentum=None),
        nn.BatchNorm2d(16, track_running_stats=False),
        nn.BatchNorm2d(16, affine=False),
    ],
    ids=["cumulative", "no_running_stats", "no_affine"],
)
def test_fused_basic_block_keeps_batch_norm_semantics(bn, backend):
    torch.manual_seed(0)
    block = BasicBlock(16, 16, attention=lambda c: CBAM(c, reduction=4))
    block.bn2 = bn
    block = randomise(block).double().train()
    ref, fused = fused_pair(block)
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
    out = compare_all(ref, fused, x, torch.randn_like(x), tol=1e-10, steps=3)  # and buffers
    assert out.grad_fn.name() == "FusedCBAMBackward"


def test_fused_block_fp32_and_its_batch_norm_running_stats(backend):
    torch.manual_seed(0)
    block = randomise(Bottleneck(64, 16, attention=CBAM)).train()
    x = torch.randn(4, 64, 14, 14)
    out = compare_fp32(block, x, torch.randn_like(x), steps=2)  # running stats included
    assert out.grad_fn.name() == "FusedCBAMBackward"


def test_gradcheck_block_fp64(backend):
    torch.manual_seed(0)
    block = randomise(Bottleneck(8, 2, attention=lambda c: CBAM(c, reduction=2))).double()
    set_cbam_impl(block, "fused")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    assert block(x).grad_fn.name() == "FusedCBAMBackward"
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


def test_block_hooks_run_the_separate_modules():
    torch.manual_seed(0)
    block = Bottleneck(32, 8, attention=CBAM).eval()
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    assert block(x).grad_fn.name() == "FusedCBAMBackward"
    for module in (block.attention, block.bn3, block.relu, block.attention.channel.sigmoid):
        seen: list = []
        handle = module.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
        out = block(x)
        handle.remove()
        assert seen and out.grad_fn.name() != "FusedCBAMBackward", type(module).__name__


def test_fused_block_keeps_no_full_size_tensor_beyond_the_plain_block():
    """What autograd keeps for the backward: the fused block keeps the same full-size tensors
    as the block without attention (the convs' inputs, the BN input, the ReLU output), plus
    small ones; the reference keeps several more full-size maps."""

    def saved_bytes(block):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(8, 256, 14, 14, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x)
        del out
        return sum(storages.values())

    torch.manual_seed(0)
    plain = saved_bytes(Bottleneck(256, 64))
    fused = saved_bytes(Bottleneck(256, 64, attention=CBAM))
    reference = saved_bytes(Bottleneck(256, 64, attention=lambda c: CBAM(c, impl="reference")))
    full = 8 * 256 * 14 * 14 * 4
    assert fused - plain < 0.1 * full  # gates, pooled vectors, argmax indices
    assert reference - plain > 2 * full


@pytest.mark.parametrize("native", [False, True], ids=["aten", "kernels"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1"])
def test_fused_models_equal_reference_models(name, native, monkeypatch):
    monkeypatch.setattr(native_cbam, "_enabled", native)
    torch.manual_seed(0)
    model = create_model(name, attention="cbam", num_classes=5, small_input=True)
    model = randomise(model).double().train()
    ref, fused = fused_pair(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grad = torch.randn(2, 5, dtype=torch.float64)
    # Both paths round differently from the reference (~1e-16 per layer: the MLP's second
    # layer applied once to the summed hidden activations; the kernels' own sums), and this
    # randomised MobileNet amplifies any such difference ~2-3x per layer (train-mode BatchNorm
    # over 8 values at 2 x 2 maps): its own outputs and gradients move by ~1e-6 when its input
    # moves by one part in 1e15. So they must agree to within 10x of that spread (~1e-11 for
    # ResNet-18); any real error is orders of magnitude larger.
    tol = max(1e-9, 10 * perturbation_spread(ref, x, grad))
    compare_all(ref, fused, x, grad, tol=tol)


def perturbation_spread(model, x, grad):
    """The largest scaled difference, over everything `compare_all` checks, between two runs
    of `model` on x and on x * (1 + 1e-15)."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    (y1, g1), (y2, g2) = run(a, x, grad), run(b, x * (1 + 1e-15), grad)
    pairs = [(y1, y2), (g1, g2), *zip(a.buffers(), b.buffers(), strict=True)]
    pairs += [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters(), strict=True)]
    return max(((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for v, u in pairs)


# --------------------------------------------------------------------------- compile


def test_compiled_fused_layer_matches_eager_channels_last(backend):
    torch._dynamo.reset()
    module = randomise(CBAM(32)).train()
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(4, 32, 10, 10).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    (y1, g1), (y2, g2) = run_both(eager, compiled, x, grad)
    assert_scaled_close(y2, y1, 1e-5, "output")
    assert_scaled_close(g2, g1, 1e-5, "input grad")
    for p1, p2 in zip(eager.parameters(), module.parameters(), strict=True):
        assert_scaled_close(p2.grad, p1.grad, 1e-4, "param grad")
    torch.testing.assert_close(module.spatial.bn.running_var, eager.spatial.bn.running_var)


def test_compiled_fused_block_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = randomise(Bottleneck(32, 8, attention=CBAM)).train()
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 32, 6, 6)
    (y1, g1), (y2, g2) = run_both(eager, compiled, x, torch.randn_like(x))
    assert_scaled_close(y2, y1, 1e-5, "output")
    assert_scaled_close(g2, g1, 1e-4, "input grad")


# --------------------------------------------------------------------------- argmax helpers


@pytest.mark.parametrize("shape", [(3, 22, 5, 7), (2, 13, 1, 1), (2, 64, 28, 28), (2, 6, 21, 20)])
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
def test_argmax_helpers_find_a_maximal_element(shape, memory_format):
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    values, index = max_over_channels(x)
    assert values.shape == index.shape == (shape[0], 1, *shape[2:])
    torch.testing.assert_close(values, x.amax(dim=1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(x.gather(1, index), values, rtol=0, atol=0)
    values, index = max_over_hw(x)
    assert values.shape == index.shape == shape[:2]
    torch.testing.assert_close(values, x.amax(dim=(2, 3)), rtol=0, atol=0)
    picked = x.flatten(2).gather(2, index.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(picked, values, rtol=0, atol=0)


def test_deterministic_mode_gives_identical_fused_gradients():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            block = Bottleneck(32, 8, attention=CBAM)
            x = torch.randn(2, 32, 8, 8, requires_grad=True)
            out = block(x)
            assert out.grad_fn.name() == "FusedCBAMBackward"  # on CPU the fused path stays on
            F.relu(out).sum().backward()
            grads.append(x.grad)
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------- Triton (CUDA)


TRITON_CHECK = """
import torch
from cbam import CBAM
from cbam.kernels import triton_cbam
from cbam.models.resnet import Bottleneck
from tests.test_fused_cbam import compare_fp32, randomise

torch.manual_seed(0)
triton_cbam.set_enabled(True)
calls = []
gate = triton_cbam.gate
triton_cbam.gate = lambda *a, **k: calls.append(1) or gate(*a, **k)
x = torch.randn(3, 8, 5, 7)
mean, values, index = triton_cbam.hw_pool(x)
torch.testing.assert_close(mean, x.mean((2, 3)))
assert torch.equal(values, x.amax((2, 3)))
assert torch.equal(index, x.flatten(2).max(2).indices)
mc = torch.rand(3, 8)
pooled, index = triton_cbam.channel_pool(x, mc)
u = x * mc[:, :, None, None]
assert torch.equal(pooled[:, :1], u.amax(1, keepdim=True))
torch.testing.assert_close(pooled[:, 1:], u.mean(1, keepdim=True))
assert torch.equal(index, u.max(1, keepdim=True).indices)
# the fused layer and a fused block running the kernels, against the reference
x = torch.randn(2, 16, 6, 7)
compare_fp32(randomise(CBAM(16, reduction=4)).train(), x, torch.randn_like(x), steps=2)
block = randomise(Bottleneck(16, 4, attention=lambda c: CBAM(c, reduction=4)))
x = torch.randn(2, 16, 5, 5)
compare_fp32(block, x, torch.randn_like(x), steps=2)
compare_fp32(block.eval(), x, torch.randn_like(x))
assert len(calls) == 5, calls
print("triton ok")
"""


def test_triton_kernels_match_pytorch_in_the_interpreter():
    """The CUDA kernels (triton_cbam.py), run by Triton's interpreter on CPU tensors. Its
    mode is fixed when Triton is imported, hence a fresh process. Unmeasured on GPU."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    run = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "triton ok" in run.stdout
