"""Property tests (Hypothesis): the fused CBAM against the reference layer over drawn inputs.

Each example draws a CBAM variant the fused path computes, a map (sizes down to 1 x 1, batch
1-3), its layout (contiguous, channels_last, transposed, sliced, broadcast from one sample),
dtype, train or eval, and the site (the module, or a residual block's fused tail); runs it on
one backend (the CPU kernels, the fused function's ATen path, or Triton's interpreter) and
compares output, input grad, parameter grads and running statistics with the reference layer.
Where the reference refuses an input (BatchNorm in training with one value per channel), the
fused path must refuse it with the same ValueError.

Every tensor is held to the float64 reference run on the same values: the fused result may be
no further from it than 4x the reference's own error in that dtype (the larger of two
summation orders: NCHW and channels_last), or RTOL of the tensor's scale (fp32: 3e-5, sums of
cancelling terms taken in another order; bf16 / fp16: 8 ulps, 6.25% / 0.8%), or RTOL / 64 of
the largest tensor's (a grad that is exactly 0 comes out as rounding noise of the terms that
cancel). Draws with an exactly tied maximum are skipped: there the reference splits the
gradient between the maxima and the fused path gives it to one (fused_cbam.py's docstring);
both are valid. In bf16 / fp16 the MLP's output layer starts at 0, so the channel gate is
exactly 0.5 and x * Mc rounds the same in both paths (a random gate would let the
reference's rounding of x * Mc create ties, and move the channel argmax, that the fused
path's fp32 product does not have); fp32 and fp64 draws keep random MLP weights.

The default suite runs FAST_EXAMPLES draws per backend; `make test-slow` SLOW_EXAMPLES.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cbam import CBAM, kernels
from cbam.bench.kernel_checks import randomise
from cbam.kernels import triton_cbam

FAST_EXAMPLES = 60
SLOW_EXAMPLES = 4000
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 2**-4, torch.float16: 2**-7}
TRITON_ENV = "CBAM_FUZZ_TRITON"


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    layout: str
    dtype: torch.dtype
    train: bool
    site: str  # "module" or "block"
    variant: tuple[tuple[str, object], ...]
    scale: float
    seed: int


@st.composite
def cases(draw: st.DrawFn, triton: bool = False) -> Case:
    """`triton`: only what the Triton kernels compute (the paper's channel pooling, channel
    then spatial, contiguous NCHW in fp32 / bf16 / fp16); otherwise any fused variant."""
    c = draw(st.integers(1, 24))
    pools = draw(st.sampled_from([("avg", "max"), ("max", "avg"), ("avg",), ("max",)]))
    spatial = "pool" if triton else draw(st.sampled_from(["pool", "conv1x1", None]))
    order = "channel_spatial" if spatial is None or triton else draw(
        st.sampled_from(["channel_spatial", "parallel"])
    )  # fmt: skip
    variant = {
        "reduction": draw(st.integers(1, c)),
        "pool_types": pools,
        "spatial": spatial,
        "kernel_size": draw(st.sampled_from([1, 3, 7])),
        "order": order,
    }
    dtype = draw(st.sampled_from(DTYPES[:1] + DTYPES[2:] if triton else DTYPES))
    # A block's BatchNorm output is rounded to the dtype in the reference but not in the
    # kernels, which can move a near-tied maximum: blocks are drawn in fp32 / fp64.
    site = draw(st.sampled_from(["module", "block"])) if dtype.itemsize >= 4 else "module"
    return Case(
        n=draw(st.integers(1, 3)),
        c=c,
        h=draw(st.integers(1, 9)),
        w=draw(st.integers(1, 9)),
        layout="contiguous" if triton else draw(st.sampled_from(LAYOUTS)),
        dtype=dtype,
        train=draw(st.booleans()),
        site=site,
        variant=tuple(variant.items()),
        scale=draw(st.sampled_from([1e-2, 1.0, 30.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` (N x C x H x W) as a tensor with the drawn strides; same values throughout."""
    n, c, h, w = values.shape
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return values.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":  # every other column of a map twice as wide
        wide = values.new_zeros(n, c, h, 2 * w)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "expanded":  # one sample broadcast over the batch (stride 0)
        return values[:1].expand(n, c, h, w)
    return values.contiguous()


class Tail(nn.Module):
    """A residual block's tail, relu(CBAM(BN(x)) + identity), as models run it: through
    `CBAM.fused_residual` where it applies, else as separate modules."""

    def __init__(self, channels: int, **variant: object) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.cbam = CBAM(channels, **variant)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        fused = self.cbam.fused_residual(x, self.bn, identity)
        if fused is not None:
            return fused
        return F.relu(self.cbam(self.bn(x)) + identity)


def build(case: Case) -> nn.Module:
    variant = dict(case.variant)
    module = CBAM(case.c, **variant) if case.site == "module" else Tail(case.c, **variant)
    randomise(module, case.seed % 1000)
    if case.dtype.itemsize < 4:  # Mc = sigmoid(0) = 0.5 exactly (see the docstring)
        cbam_layer = module if isinstance(module, CBAM) else module.cbam
        with torch.no_grad():
            cbam_layer.channel.mlp[2].weight.zero_()
            cbam_layer.channel.mlp[2].bias.zero_()
    return module.to(case.dtype).train(case.train)


def inputs(case: Case) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    shape = (case.n, case.c, case.h, case.w)
    values = [torch.randn(shape, generator=g, dtype=torch.float64) * case.scale]
    if case.layout == "expanded":
        values[0] = values[0][:1].expand(shape).clone()
    if case.site == "block":
        values.append(torch.randn(shape, generator=g, dtype=torch.float64))
    return [v.to(case.dtype) for v in values]


def unique_max(x: torch.Tensor, dim: tuple[int, ...] | int) -> bool:
    return bool(((x == x.amax(dim=dim, keepdim=True)).sum(dim=dim) == 1).all())


def no_ties(case: Case, module: nn.Module, values: list[torch.Tensor]) -> bool:
    """No exactly tied maximum in either max pool of the reference, in the map's dtype."""
    layer = module if isinstance(module, CBAM) else module.cbam
    x = values[0]
    if case.site == "block":
        try:
            with torch.no_grad():
                x = copy.deepcopy(module.bn)(x)
        except ValueError:  # refused (one value per channel): `check` expects that
            return True
    ok = "max" not in layer.channel.pool_types or unique_max(x, (2, 3))
    if layer.spatial is not None and layer.spatial.method == "pool":
        with torch.no_grad():
            source = x if layer.order == "parallel" else x * layer.channel.gate(x)
        ok = ok and unique_max(source, 1)
    return ok


def run(module: nn.Module, values: list[torch.Tensor], case: Case, grad: torch.Tensor) -> list:
    """[output, grads of the inputs and parameters..., buffers...] of one forward + backward."""
    leaves = [in_layout(v, case.layout).detach().requires_grad_() for v in values]
    out = module(*leaves)
    out.backward(in_layout(grad, case.layout))
    results = [out.detach(), *(leaf.grad for leaf in leaves)]
    results += [p.grad for p in module.parameters()]
    return results + [b.clone() for b in module.buffers() if b.is_floating_point()]


def check(case: Case, backend: str) -> None:
    # A batch of one sample repeated, of 1 x 1 maps: in training every BatchNorm then sees
    # equal values, zero variance, and scales the rounding noise of x - mean by 1 / sqrt(eps)
    # (~316): the exact grads are 0 and any two summation orders differ by ~1e-6.
    assume(not (case.train and case.layout == "expanded" and case.h * case.w == 1))
    module = build(case)
    values = inputs(case)
    assume(no_ties(case, module, values))
    reference, fused = copy.deepcopy(module), copy.deepcopy(module)
    reference.apply(lambda m: setattr(m, "impl", "reference") if isinstance(m, CBAM) else None)
    alternate = copy.deepcopy(reference)
    truth = copy.deepcopy(reference).double()
    grad = torch.randn(values[0].shape, generator=torch.Generator().manual_seed(case.seed + 1))
    grad = grad.to(case.dtype)
    try:
        expected = run(reference, values, case, grad)
    except ValueError as error:  # e.g. BatchNorm's "more than 1 value per channel"
        with pytest.raises(ValueError, match=str(error)[:40]):
            run(fused, values, case, grad)
        return
    exact = run(truth, [v.double() for v in values], case, grad.double())
    # The reference's rounding error, as the larger of two summation orders: one run can be
    # luckily exact on a sum of cancelling terms that the fused path takes in another order.
    other = replace(case, layout="channels_last" if case.layout == "contiguous" else "contiguous")
    reordered = run(alternate, values, other, grad)
    if backend == "aten":
        with kernels.disabled():
            actual = run(fused, values, case, grad)
    else:
        actual = run(fused, values, case, grad)
    rtol = RTOL[case.dtype]
    overall = max(t.abs().max().item() for t in exact)
    for i, (want, ref, ref2, got) in enumerate(
        zip(exact, expected, reordered, actual, strict=True)
    ):
        assert got is not None and got.shape == want.shape, f"tensor {i}: {got}"
        assert got.dtype == ref.dtype, f"tensor {i}: dtype {got.dtype}, reference {ref.dtype}"
        scale = want.abs().max().item()
        ref_error = max((r.double() - want).abs().max().item() for r in (ref, ref2))
        error = (got.double() - want).abs().max().item()
        allowed = max(4 * ref_error, rtol * scale, rtol / 64 * overall)
        assert error <= allowed, (
            f"tensor {i} of {len(exact)}: error {error:.3g} > {allowed:.3g} "
            f"(scale {scale:.3g}, reference's error {ref_error:.3g})"
        )


def fuzz(backend: str, examples: int, draws: st.SearchStrategy[Case] | None = None):
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same draws on every run: CI failures reproduce locally
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=draws or cases())
    def test(case: Case) -> None:
        check(case, backend)

    return test


test_cpu_kernels_match_reference = fuzz("native", FAST_EXAMPLES)
test_aten_path_matches_reference = fuzz("aten", FAST_EXAMPLES)
test_cpu_kernels_match_reference_many = pytest.mark.slow(fuzz("native", SLOW_EXAMPLES))
test_aten_path_matches_reference_many = pytest.mark.slow(fuzz("aten", SLOW_EXAMPLES))


@pytest.mark.skipif(os.environ.get(TRITON_ENV) is None, reason="run by the interpreter test")
def test_triton_kernels_match_reference() -> None:
    """Only in the subprocess below, where Triton was imported in interpreter mode."""
    triton_cbam.set_enabled(True)
    calls = []
    pool = triton_cbam.hw_pool
    triton_cbam.hw_pool = lambda *a: calls.append(1) or pool(*a)
    try:
        fuzz("triton", int(os.environ[TRITON_ENV]), cases(triton=True))()
    finally:
        triton_cbam.hw_pool = pool
    assert len(calls) >= int(os.environ[TRITON_ENV]) // 2, len(calls)  # the kernels ran


@pytest.mark.parametrize("examples", [pytest.param(20), pytest.param(300, marks=pytest.mark.slow)])
def test_triton_interpreter(examples: int) -> None:
    """The Triton kernels (CUDA) under Triton's interpreter on CPU tensors: its mode is fixed
    when Triton is imported, hence a fresh process. Unmeasured on GPU."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", **{TRITON_ENV: str(examples)})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
               "-k", "test_triton_kernels_match_reference"]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]
