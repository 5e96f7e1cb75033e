"""The fused CBAM under autocast: it runs (no longer the reference path), keeps the map in the
dtype autocast gave it, and equals the reference module under the same autocast within
half-precision tolerance, outputs and gradients, module and residual-block tail, eager and
compiled; fp16 through Triton's interpreter. Autocast off is unchanged (the other tests).

Tolerance: each tensor is held to a float64 run of the reference on the same values, and the
fused result may be no further from it than 1.25x the reference under autocast is, or 2^-5 (4 bf16
ulps) of the tensor's scale. Inputs are tie-free (every max pool has one maximum) and the
channel gate is exactly 0.5 (the MLP's output layer starts at 0): with ties the two paths
give the max pool's gradient to different valid maxima (see fused_cbam.py)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbam import CBAM, create_model
from cbam.bench.kernel_checks import randomise
from cbam.models.resnet import BasicBlock

TOL = 2**-5


def distinct_map(n: int, c: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """Values k / 32 with k distinct within every (n, c) map and every (n, h, w) column, all
    exact in bf16: x = ((c * h * w + p) * 37 mod 256 - 128) / 32, p the position."""
    index = torch.arange(c * h * w).view(1, c, h, w).expand(n, c, h, w)
    shift = torch.arange(n).view(n, 1, 1, 1) * 11
    return (((index + shift) * 37) % 256 - 128).to(dtype) / 32


def zero_output_layer(module: torch.nn.Module) -> torch.nn.Module:
    for layer in module.modules():
        if isinstance(layer, CBAM):
            with torch.no_grad():
                layer.channel.mlp[2].weight.zero_()
                layer.channel.mlp[2].bias.zero_()
    return module


def grads(module, inputs, g, dtype):
    """[output, input grads, parameter grads] of one forward under autocast (None: without)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    if dtype is None:
        out = module(*leaves)
    else:
        with torch.autocast("cpu", dtype=dtype):
            out = module(*leaves)
    out.backward(g.to(out.dtype))
    return [out, *(x.grad for x in leaves), *(p.grad for p in module.parameters())], out


def check_close(module, inputs, dtype=torch.bfloat16):
    g = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(module)
    reference.apply(lambda m: setattr(m, "impl", "reference") if isinstance(m, CBAM) else None)
    exact, _ = grads(copy.deepcopy(reference).double(), [x.double() for x in inputs],
                     g.double(), None)  # fmt: skip
    expected, _ = grads(reference, inputs, g, dtype)
    actual, out = grads(module, inputs, g, dtype)
    assert actual[0].dtype == expected[0].dtype, (actual[0].dtype, expected[0].dtype)
    for i, (e, r, a) in enumerate(zip(exact, expected, actual, strict=True)):
        scale = e.abs().max().item()
        ref_error = (r.double() - e).abs().max().item()
        error = (a.double() - e).abs().max().item()
        assert error <= max(1.25 * ref_error, TOL * scale), (i, error, ref_error, scale)
    return out


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32], ids=["bf16-in", "fp32-in"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant", [{}, {"spatial": None}, {"order": "parallel"}], ids=str)
def test_module_under_autocast(in_dtype, train, fmt, variant):
    module = zero_output_layer(randomise(CBAM(16, reduction=4, **variant))).train(train)
    x = distinct_map(2, 16, 5, 6, in_dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = check_close(module, [x])
    assert type(out.grad_fn).__name__ == "FusedCBAMBackward"  # the fused path ran
    assert out.dtype == in_dtype  # as the reference: x * gate keeps x's dtype


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_tail_under_autocast(train):
    torch.manual_seed(0)
    block = BasicBlock(16, 16, attention=lambda c: CBAM(c, reduction=4))
    block = zero_output_layer(randomise(block)).train(train)
    x = distinct_map(2, 16, 5, 6, torch.bfloat16)
    check_close(block, [x])


def test_a_model_trains_under_autocast_with_the_fused_path():
    """A CBAM ResNet-20 step under bf16 autocast: the fused path's loss and gradients match
    the reference path's (same step under the same autocast) within bf16 tolerance."""
    torch.manual_seed(0)
    model = create_model("resnet20", attention="cbam", num_classes=10)
    reference = copy.deepcopy(model)
    reference.apply(lambda m: setattr(m, "impl", "reference") if isinstance(m, CBAM) else None)
    x, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    losses, params = [], []
    for net in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), labels)
        loss.backward()
        losses.append(loss.item())
        params.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert abs(losses[0] - losses[1]) <= 0.02 * abs(losses[1])
    cosine = torch.nn.functional.cosine_similarity(params[0], params[1], dim=0).item()
    assert cosine > 0.99, cosine


def test_compiled_under_autocast_matches_eager():
    torch._dynamo.reset()
    module = zero_output_layer(randomise(CBAM(16, reduction=4))).train()
    x = distinct_map(2, 16, 5, 6, torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    g = torch.randn(x.shape)
    eager, _ = grads(module, [x], g, torch.bfloat16)
    traced, _ = grads(compiled, [x], g, torch.bfloat16)
    for e, c in zip(eager, traced, strict=True):
        assert (c.double() - e.double()).abs().max() <= TOL * e.abs().max().double()


TRITON_FP16 = """
import torch
from cbam.kernels import triton_cbam
from tests.test_fused_autocast import CBAM, check_close, distinct_map, randomise
from tests.test_fused_autocast import zero_output_layer
triton_cbam.set_enabled(True)
calls = []
pool = triton_cbam.hw_pool
triton_cbam.hw_pool = lambda *a: calls.append(1) or pool(*a)
for train in (True, False):
    module = zero_output_layer(randomise(CBAM(16, reduction=4))).train(train)
    check_close(module, [distinct_map(2, 16, 5, 6, torch.float16)], dtype=torch.float16)
assert len(calls) == 2, calls
print("triton fp16 ok")
"""


def test_fp16_autocast_through_tritons_interpreter():
    """The Triton kernels (CUDA) with fp16 maps under fp16 autocast, in Triton's interpreter
    on CPU tensors (a fresh process: the mode is fixed at import). Unmeasured on GPU."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", TRITON_FP16], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton fp16 ok" in done.stdout
