"""The fused CBAM's compiled CPU kernels (kernels/csrc/cbam_cpu.cpp), one by one against the
ATen ops they replace, and what happens where they cannot be built."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from tests.test_fused_cbam import compare_fp32, randomise

from cbam import CBAM
from cbam.kernels import native_cbam
from cbam.layers.cbam import set_cbam_impl
from cbam.models.resnet import Bottleneck

FORMATS = [torch.contiguous_format, torch.channels_last]
# H x W below, at and above the kernels' 16 lanes, odd tails
SHAPES = [(3, 5, 2, 3), (2, 37, 4, 4), (2, 19, 9, 9), (3, 21, 13, 11), (2, 64, 28, 28)]


@pytest.fixture(scope="module")
def kernels():
    module = native_cbam.load()
    assert module is not None, "the CPU kernels did not build"
    return module


def layout(t, memory_format):
    return t.contiguous(memory_format=memory_format)


def affine(c, dtype=torch.float32):
    """A BatchNorm-like per-channel scale (some negative) and shift."""
    alpha = torch.randn(c, dtype=dtype)
    alpha[::3] = -alpha[::3].abs()
    return alpha, torch.randn(c, dtype=dtype)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_hw_stats(kernels, shape, dtype, memory_format):
    x = layout(torch.randn(shape).to(dtype), memory_format)
    h, w = shape[2:]
    mean, m2, top, top_at, low, low_at = kernels.hw_stats(x, True, True)
    flat = x.double().flatten(2)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    tol = {"rtol": tol, "atol": tol}
    torch.testing.assert_close(mean.double(), flat.mean(2), **tol)
    torch.testing.assert_close(m2.double(), flat.var(2, correction=0) * h * w, **tol)
    torch.testing.assert_close(top.double(), flat.amax(2))
    torch.testing.assert_close(low.double(), flat.amin(2))
    # the first position holding the max (min), as torch.argmax finds it for unique values
    first = (flat == flat.amax(2, keepdim=True)).double().argmax(2)
    assert top_at.dtype == low_at.dtype == torch.int32  # half the bytes kept for the backward
    torch.testing.assert_close(top_at.long(), first)
    torch.testing.assert_close(
        low_at.long(), (flat == flat.amin(2, keepdim=True)).double().argmax(2)
    )
    full = (mean, m2, top, top_at, low, low_at)
    for with_index, with_variance in [(False, False), (True, False), (False, True)]:
        part = kernels.hw_stats(x, with_index, with_variance)  # what is not asked: no rows
        wanted = [True, with_variance, True, with_index, True, with_index]
        for got, expected, asked in zip(part, full, wanted, strict=True):
            if asked:
                torch.testing.assert_close(got, expected)
            else:
                assert got.shape == (0, shape[1]) and got.dtype == expected.dtype


def test_hw_stats_ties_go_to_the_first_position(kernels):
    x = torch.zeros(1, 3, 9, 9)
    x[0, :, 2, 5] = x[0, :, 7, 1] = 2.0  # the max at 2 * 9 + 5 = 23 and 64
    x[0, :, 4, 4] = x[0, :, 8, 8] = -1.0  # the min at 40 and 80
    for memory_format in FORMATS:
        _, _, _, top_at, _, low_at = kernels.hw_stats(layout(x, memory_format), True, False)
        assert top_at.tolist() == [[23] * 3] and low_at.tolist() == [[40] * 3]


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_affine", [True, False], ids=["block", "module"])
def test_channel_pool_and_gate(kernels, shape, memory_format, with_affine):
    n, c, h, w = shape
    x = layout(torch.randn(shape), memory_format)
    alpha, beta = affine(c) if with_affine else (None, None)
    mc, ms = torch.rand(n, c), torch.rand(n, 1, h, w)
    feature = x * alpha[:, None, None] + beta[:, None, None] if with_affine else x
    u = feature * mc[:, :, None, None]
    pooled, index = kernels.channel_pool(x, alpha, beta, mc, True)
    values, _ = u.max(dim=1, keepdim=True)
    torch.testing.assert_close(pooled, torch.cat([values, u.mean(dim=1, keepdim=True)], dim=1))
    assert index.dtype == torch.int32
    assert torch.equal(u.gather(1, index.long()), values)  # the index points at a maximum
    pooled_only, no_index = kernels.channel_pool(x, alpha, beta, mc, False)  # eval: no argmax
    assert torch.equal(pooled_only, pooled) and no_index.numel() == 0
    identity = layout(torch.randn(shape), memory_format) if with_affine else None
    out = kernels.gate(x, alpha, beta, mc, ms, identity, False)
    expected = (u * ms + identity).relu() if with_affine else u * ms
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=memory_format)
    written_over = kernels.gate(x, alpha, beta, mc, ms, identity, True)  # x is the output
    assert written_over.data_ptr() == x.data_ptr() and torch.equal(x, out)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_affine", [True, False], ids=["block", "module"])
def test_backward_passes(kernels, shape, memory_format, with_affine):
    n, c, h, w = shape
    x = layout(torch.randn(shape, dtype=torch.float64), memory_format)
    alpha, beta = affine(c, torch.float64) if with_affine else (None, None)
    mc, ms = torch.rand(n, c, dtype=torch.float64), torch.rand(n, 1, h, w, dtype=torch.float64)
    g_out = torch.randn(shape, dtype=torch.float64)  # NCHW either way: the kernel relayouts
    out = layout(torch.randn(shape, dtype=torch.float64), memory_format) if with_affine else None
    g_y, g_ms, s0, s1 = kernels.backward_reduce(g_out, out, x, alpha, beta, mc, ms)
    expected_g_y = g_out * (out > 0) if with_affine else g_out
    if with_affine:
        torch.testing.assert_close(g_y, expected_g_y)
    else:  # g_y is g_out, which an op may not return
        assert g_y.numel() == 0
        g_y = g_out
    feature = x * alpha[:, None, None] + beta[:, None, None] if with_affine else x
    torch.testing.assert_close(g_ms, (expected_g_y * feature * mc[:, :, None, None]).sum(1, True))
    torch.testing.assert_close(s0, (expected_g_y * ms).sum((2, 3)))
    torch.testing.assert_close(s1, (expected_g_y * ms * x).sum((2, 3)))
    g_mean = torch.randn(n, 1, h, w, dtype=torch.float64)
    scale, shift = torch.randn(n, c, dtype=torch.float64), torch.randn(n, c, dtype=torch.float64)
    k2 = torch.randn(c, dtype=torch.float64) if with_affine else None
    grad = kernels.grad_input(g_y, x, ms, g_mean, scale, k2, shift)
    expected = scale[:, :, None, None] * (g_y * ms + g_mean) + shift[:, :, None, None]
    if k2 is not None:
        expected = expected + k2[:, None, None] * x
    torch.testing.assert_close(grad, expected)
    assert grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 2, 3), (3, 5, 9), (1, 3, 16), (2, 4, 17), (2, 28, 28)], ids=str
)
def test_the_spatial_conv_and_its_backward_equal_atens(kernels, shape, kernel_size):
    n, h, w = shape
    pad = kernel_size // 2
    x = torch.randn(n, 2, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, weight, padding=pad)
    g_s = torch.randn_like(expected)
    g_x, g_weight = torch.autograd.grad(expected, (x, weight), g_s)
    with torch.no_grad():
        torch.testing.assert_close(kernels.spatial_conv(x, weight, pad), expected)
        got_x, got_weight = kernels.spatial_conv_backward(g_s, x, weight, pad)
    torch.testing.assert_close(got_x, g_x)
    torch.testing.assert_close(got_weight, g_weight)
    with pytest.raises(RuntimeError, match="output grad must be N x 1 x H x W"):
        kernels.spatial_conv_backward(g_s[:, :, :, :0], x.detach(), weight.detach(), pad)
    with pytest.raises(RuntimeError, match="input must be N x 2 x H x W"):
        kernels.spatial_conv(x.detach()[:, :1], weight.detach(), pad)
    with pytest.raises(RuntimeError, match=f"padding must be .* = {pad}, got {pad + 1}"):
        kernels.spatial_conv(x.detach(), weight.detach(), pad + 1)
    # float32 input and weight: results in their dtypes
    out = kernels.spatial_conv(x.detach().float(), weight.detach().float(), pad)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_the_fused_layer_and_block_run_the_kernels(kernels, monkeypatch):
    calls = []

    class Counting:
        def __getattr__(self, name):
            return lambda *args: calls.append(name) or getattr(kernels, name)(*args)

    monkeypatch.setattr(native_cbam, "_module", Counting())
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    Bottleneck(32, 8, attention=CBAM)(x).sum().backward()
    assert calls == ["forward_train", "backward_train"]  # one call each way
    calls.clear()
    with torch.no_grad():
        CBAM(32).eval()(x)
        Bottleneck(32, 8, attention=CBAM).eval()(x)
    assert calls == ["forward_eval", "forward_eval"]  # eval mode: one call
    calls.clear()
    with torch.no_grad():  # batch statistics, which the eval forward does not compute
        Bottleneck(32, 8, attention=CBAM).train()(x)
    assert calls == ["forward_train"]


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("block", [False, True], ids=["module", "block"])
def test_a_forward_without_grad_on_batch_statistics_equals_the_reference(
    kernels, block, memory_format
):
    """No autograd, BatchNorms in training mode (as when recalibrating their statistics): the
    training forward runs for its batch statistics, and updates the running ones as the
    reference does."""
    torch.manual_seed(0)
    model = Bottleneck(32, 8, attention=CBAM) if block else CBAM(32)
    model = randomise(model).train().to(memory_format=memory_format)
    reference = copy.deepcopy(model)
    set_cbam_impl(reference, "reference")
    x = layout(torch.randn(3, 32, 7, 9), memory_format)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    for (name, got), expected in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


EVAL_VARIANTS = [{}, {"pool_types": ("max",)}, {"pool_types": ("max", "avg")},
                 {"pool_types": ("avg",), "kernel_size": 3, "reduction": 4}]  # fmt: skip


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 32, 3, 5), (3, 32, 9, 7), (2, 32, 28, 28)], ids=str)
@pytest.mark.parametrize("kwargs", EVAL_VARIANTS, ids=str)
@pytest.mark.parametrize("block", [False, True], ids=["module", "block"])
def test_the_eval_forward_in_one_call_equals_the_reference(
    kernels, block, kwargs, shape, memory_format
):
    torch.manual_seed(0)
    if block:
        model = Bottleneck(32, 8, attention=lambda c: CBAM(c, **kwargs))
    else:
        model = CBAM(32, **kwargs)
    model = randomise(model).double().eval().to(memory_format=memory_format)
    reference = copy.deepcopy(model)
    set_cbam_impl(reference, "reference")
    x = layout(torch.randn(shape, dtype=torch.float64), memory_format)
    with torch.no_grad():
        expected = reference(x)
        with native_cbam.disabled():
            aten = model(x)
        for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
            out = model.to(dtype)(x.to(dtype))
            assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
            error = (out.double() - expected).abs().max() / expected.abs().max()
            assert error <= tol, f"{dtype}: scaled error {error:.3g}"
    torch.testing.assert_close(aten, expected, rtol=1e-12, atol=1e-12)


def test_eval_blocks_write_over_their_conv_output_unless_a_hook_saw_it(kernels):
    torch.manual_seed(0)
    block = randomise(Bottleneck(32, 8, attention=CBAM)).eval()
    reference = copy.deepcopy(block)
    set_cbam_impl(reference, "reference")
    x = torch.randn(2, 32, 6, 6)
    made = []  # the conv's outputs, recorded without a hook
    conv_forward = block.conv3.forward
    block.conv3.forward = lambda t: made.append(conv_forward(t)) or made[-1]
    with torch.no_grad():
        expected = reference(x)
        out = block(x)  # no hook: the conv's output is scratch, and it holds the result
        assert out.data_ptr() == made[-1].data_ptr()
        torch.testing.assert_close(out, expected)
        kept = []
        block.conv3.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
        out = block(x)
    saved, copy_at_the_time = kept[0]
    assert out.data_ptr() != saved.data_ptr() and torch.equal(saved, copy_at_the_time)
    torch.testing.assert_close(out, expected)


def op_arguments(kernels, memory_format, block, batch):
    """Arguments for the kernels' two torch ops on a small map: forward_train's, and
    backward_train's from forward_train's outputs. `batch`: BatchNorms on batch statistics."""
    n, c, h, w, hidden = 2, 19, 5, 6, 4
    x = layout(torch.randn(n, c, h, w), memory_format)
    identity = layout(torch.randn_like(x), memory_format) if block else None
    bn_c = (torch.randn(c), torch.randn(c), torch.randn(c), torch.rand(c) + 0.5)
    block_bn = (*bn_c, batch, 0.1, 1e-5) if block else (None,) * 4 + (False, 0.0, 0.0)
    mlp = (torch.randn(hidden, c), torch.randn(hidden), torch.randn(c, hidden), torch.randn(c))
    conv_w = torch.randn(1, 2, 3, 3)
    spatial = (torch.randn(1), torch.randn(1), torch.randn(1), torch.rand(1) + 0.5)
    forward = (x, identity, *block_bn, *mlp, "avg,max", conv_w, 1, *spatial, batch, 0.1,
               1e-5)  # fmt: skip
    out, *kept = kernels.forward_train(*copy.deepcopy(forward))
    backward = (torch.randn_like(x), out if block else None, x, *kept, *block_bn[:2], batch,
                *mlp, "avg,max", conv_w, 1, *spatial[:2], batch, 1e-5)  # fmt: skip
    return {"forward_train": forward, "backward_train": backward}


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("block", [False, True], ids=["module", "block"])
def test_the_torch_ops_and_their_fakes_agree_with_the_kernels(kernels, block, batch, memory_format):
    """torch.library.opcheck: each op's schema (the running statistics it updates are declared)
    and its fake implementation (sizes, dtypes, strides) against the real outputs; and each op
    returns what the extension's function returns."""
    for name, args in op_arguments(kernels, memory_format, block, batch).items():
        op = getattr(torch.ops.cbam, name)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        expected = getattr(kernels, name)(*copy.deepcopy(args))
        got = op(*copy.deepcopy(args))
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(g, e) and g.stride() == e.stride() and g.dtype == e.dtype, name


def test_the_ops_reject_bad_calls(kernels, monkeypatch):
    calls = op_arguments(kernels, torch.contiguous_format, True, True)
    args, back = calls["forward_train"], list(calls["backward_train"])
    with pytest.raises(RuntimeError, match="the map must be N x C x H x W, got 2 dims"):
        torch.ops.cbam.forward_train(torch.randn(3, 4), *args[1:])
    with pytest.raises(RuntimeError, match=r"a map passed with the input must have its size"):
        torch.ops.cbam.forward_train(args[0], args[1][:, :-1], *args[2:])  # the identity
    with pytest.raises(RuntimeError, match="block BatchNorm's weight must have 19 elements"):
        torch.ops.cbam.forward_train(*args[:2], torch.randn(18), *args[3:])
    w1, b1, w2, b2 = args[9:13]  # the MLP's layers (C = 19): wrong sizes read out of bounds
    for at, wrong, message in [
        (9, w1[:, :-1], r"MLP layer's weight must be outputs x 19 for its 19 inputs"),
        (10, b1[:-1], r"MLP layer's bias must have \d+ elements"),
        (11, w2[:, :-1], r"MLP layer's weight must be outputs x \d+ for its \d+ inputs"),
        (12, b2[:-1], r"MLP layer's bias must have 19 elements"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.cbam.forward_train(*args[:at], wrong, *args[at + 1 :])
    with pytest.raises(RuntimeError, match=r"second weight must have one row per channel \(19\)"):
        torch.ops.cbam.forward_train(*args[:11], w2[:-1], b2[:-1], *args[13:])
    bad_grad = [torch.randn(2, 19, 5, 5), *back[1:]]
    with pytest.raises(RuntimeError, match=r"a map passed with the input must have its size"):
        torch.ops.cbam.backward_train(*bad_grad)
    with pytest.raises(RuntimeError, match="mc must have 38 elements"):
        torch.ops.cbam.backward_train(*back[:3], back[3][:1], *back[4:])
    for at, index, message in [
        (8, 19, "idx_c holds channel 19"),
        (9, 30, "idx_hw holds position 30"),
    ]:
        wrong = back[at].clone()
        wrong.view(-1)[0] = index  # one past the last channel / position
        with pytest.raises(RuntimeError, match=message):
            torch.ops.cbam.backward_train(*back[:at], wrong, *back[at + 1 :])
    monkeypatch.setattr(native_cbam, "_module", None)
    monkeypatch.setattr(native_cbam, "_failed", True)  # as after a failed build
    with pytest.raises(RuntimeError, match=r"could not be built.*Install g\+\+ and ninja"):
        torch.ops.cbam.forward_train(*args)


def test_compiled_graphs_call_the_kernels(kernels, monkeypatch):
    """Under torch.compile (fullgraph) the fused block's training step runs the same kernels
    as in eager mode, through the torch ops, and matches eager mode; compiled inference runs
    the ATen path (Inductor fuses it better than the kernels' one-call forward)."""
    calls = []

    class Counting:
        def __getattr__(self, name):
            return lambda *args: calls.append(name) or getattr(kernels, name)(*args)

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = randomise(Bottleneck(32, 8, attention=CBAM)).train()
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    monkeypatch.setattr(native_cbam, "_module", Counting())
    y = compiled(x)
    y.sum().backward()
    assert calls == ["forward_train", "backward_train"]
    monkeypatch.setattr(native_cbam, "_module", kernels)
    grad, x.grad = x.grad, None
    y_eager = eager(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad, x.grad)
    calls.clear()
    monkeypatch.setattr(native_cbam, "_module", Counting())
    with torch.no_grad():
        got = torch.compile(block.eval(), fullgraph=True)(x)
        assert calls == []
        torch.testing.assert_close(got, block(x))


def test_a_failed_build_warns_once_and_the_aten_path_runs(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'cbam_cpu': g++: not found")

    monkeypatch.setattr(native_cbam, "_module", None)
    monkeypatch.setattr(native_cbam, "_failed", False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    module = randomise(CBAM(16)).train()
    x = torch.randn(2, 16, 5, 5)
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernels.*g\\+\\+: not found"):
        compare_fp32(module, x, torch.randn_like(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        compare_fp32(module, x, torch.randn_like(x))
    assert native_cbam.load() is None


def test_the_environment_variable_turns_them_off():
    code = "from cbam.kernels import native_cbam; print(native_cbam.enabled())"
    env = {**os.environ, "CBAM_NATIVE": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr[-2000:]


def test_bf16_block_runs_the_kernels_close_to_fp32(kernels):
    torch.manual_seed(0)
    block = randomise(Bottleneck(32, 8, attention=CBAM)).train()
    x = torch.randn(4, 32, 9, 9)
    block16 = Bottleneck(32, 8, attention=CBAM).train()
    block16.load_state_dict(block.state_dict())
    block16 = block16.to(torch.bfloat16)
    y32, y16 = block(x), block16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and y16.grad_fn.name() == "FusedCBAMBackward"
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 2e-2


def test_nan_propagates_through_the_block_like_the_reference(kernels):
    block = Bottleneck(32, 8, attention=CBAM).train()
    x = torch.randn(2, 32, 6, 6)
    x[0, 3, 2, 2] = float("nan")
    assert torch.isnan(block(x)).any()  # a swallowed NaN would hide a diverged training run
