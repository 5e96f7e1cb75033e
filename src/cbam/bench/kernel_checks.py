"""Checks of the fused CBAM against the reference layer on any device, for `gpu_check.py`.

The test suite checks the fused path on CPU; these run the same comparisons where the CPU
tests cannot: on CUDA, with the Triton kernels, in half precision. Each comparison runs one
module (or residual block) three times: the reference layer in float64 (the truth), the
reference layer in the case's dtype, and the fused path in that dtype. The fused result must be
within the dtype's tolerance of the truth, or no further from it than 4x the reference's own
error in that dtype (a gradient that sums thousands of terms has a rounding error above any
fixed tolerance, in the reference as much as in the fused path).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cbam import kernels
from cbam.layers import CBAM, SPATIAL_METHODS, set_cbam_impl
from cbam.models.resnet import Bottleneck

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# max error over max |truth| in float32; norm error over norm of truth in half precision,
# where ties in a max are common and move a whole gradient entry (see tests/test_fused_cbam.py)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
MODES = ("train", "eval", "inference")  # inference: eval mode without autograd


def fused_variants() -> list[dict[str, Any]]:
    """Every CBAM variant the fused path claims to compute: each pooling it supports, each
    order, each spatial method or none; plus a 3x3 spatial conv with a wider bottleneck."""
    variants: list[dict[str, Any]] = []
    for pools in (("avg",), ("max",), ("avg", "max"), ("max", "avg")):
        variants.append({"pool_types": pools, "spatial": None})
        for order in kernels.FUSED_ORDERS:
            for spatial in SPATIAL_METHODS:
                variants.append({"pool_types": pools, "order": order, "spatial": spatial})
    variants.append({"kernel_size": 3, "reduction": 4})
    return variants


def paper_variant(variant: dict[str, Any]) -> bool:
    """Whether the CPU and Triton kernels cover `variant`: channel pooling, channel first."""
    return (
        variant.get("spatial", "pool") == "pool"
        and variant.get("order", "channel_spatial") == "channel_spatial"
    )


@dataclass(frozen=True)
class Case:
    kind: str  # "module" (CBAM alone) or "block" (a Bottleneck whose tail is fused)
    variant: dict[str, Any]
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    memory_format: str
    mode: str

    @property
    def name(self) -> str:
        variant = ",".join(f"{k}={v}" for k, v in self.variant.items()) or "default"
        dtype = str(self.dtype).removeprefix("torch.")
        shape = "x".join(map(str, self.shape))
        return f"{self.kind} {variant} {shape} {dtype} {self.memory_format} {self.mode}"

    @property
    def nchw_contiguous(self) -> bool:
        """Whether the input is contiguous NCHW (a 1x1 map is both layouts at once)."""
        layout = FORMATS[self.memory_format]
        return torch.empty(self.shape).contiguous(memory_format=layout).is_contiguous()


def cases(
    kinds: Sequence[str],
    variants: Sequence[dict[str, Any]],
    shapes: Sequence[tuple[int, int, int, int]],
    dtypes: Sequence[torch.dtype],
    formats: Sequence[str] = tuple(FORMATS),
    modes: Sequence[str] = MODES,
) -> Iterator[Case]:
    """Every combination of the arguments, as cases."""
    for dtype in dtypes:
        for shape in shapes:
            for fmt in formats:
                for kind in kinds:
                    for variant in variants:
                        for mode in modes:
                            yield Case(kind, variant, shape, dtype, fmt, mode)


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN statistics, so that no term is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module


def build(case: Case) -> nn.Module:
    channels = case.shape[1]
    if case.kind == "module":
        return CBAM(channels, **case.variant)
    return Bottleneck(channels, channels // 4, attention=lambda c: CBAM(c, **case.variant))


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> list[Any]:
    """[output, input grad, parameter grads..., buffers...] of one forward (+ backward)."""
    module.train(mode == "train")
    if mode == "inference":
        with torch.no_grad():
            return [module(x)]
    xi = x.detach().clone().requires_grad_()
    out = module(xi)
    out.backward(grad)
    return [out, xi.grad, *(p.grad for p in module.parameters()), *module.buffers()]


def _error(actual: Any, truth: Any, dtype: torch.dtype) -> float:
    if actual is None or truth is None:
        return 0.0 if actual is truth else float("inf")
    a, t = actual.double(), truth.double()
    if dtype == torch.float32:
        return ((a - t).abs().max() / t.abs().max().clamp_min(1e-30)).item()
    return ((a - t).norm() / t.norm().clamp_min(1e-30)).item()


def compare_case(case: Case, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """The fused path's worst error against the float64 reference over every output, gradient
    and buffer of `case`, and what was allowed; raises AssertionError past the allowance."""
    torch.manual_seed(seed)
    base = randomise(build(case), seed)
    layout = FORMATS[case.memory_format]
    runs = []
    for impl, dtype in (("reference", torch.float64), ("reference", case.dtype),
                        ("fused", case.dtype)):  # fmt: skip
        module = copy.deepcopy(base).to(device, dtype, memory_format=layout)
        set_cbam_impl(module, impl)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(case.shape, generator=g).to(case.dtype)  # the same values for all
        grad = torch.randn(case.shape, generator=g).to(case.dtype)
        x, grad = (t.to(device, dtype).contiguous(memory_format=layout) for t in (x, grad))
        runs.append(_run(module, x, grad, case.mode))
    names = ["output", "input grad"]
    names += [f"grad {n}" for n, _ in base.named_parameters()]
    names += [n for n, _ in base.named_buffers()]
    tolerance = TOLERANCE[case.dtype]
    worst: dict[str, Any] = {"ratio": -1.0}
    for name, truth, reference, fused in zip(names, *runs, strict=False):
        error = _error(fused, truth, case.dtype)
        allowed = max(tolerance, 4 * _error(reference, truth, case.dtype))
        if error / allowed > worst["ratio"]:
            worst = {"tensor": name, "error": error, "allowed": allowed, "ratio": error / allowed}
    if worst["ratio"] > 1:
        raise AssertionError(
            f"{case.name}: {worst['tensor']} error {worst['error']:.3g} > allowed "
            f"{worst['allowed']:.3g}"
        )
    return worst


@contextlib.contextmanager
def counting(module: ModuleType, name: str) -> Iterator[list[int]]:
    """Count calls of `module.name` inside the block (one entry per call)."""
    original = getattr(module, name)
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


# --------------------------------------------------------------------------- host syncs

# ATen ops that read a device tensor's value (or its size) back to the host
_SYNC_OPS = (
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "equal", "is_nonzero", "allclose",
)  # fmt: skip
_SYNC_METHODS = ("item", "tolist", "numpy", "cpu")


class _SyncOps(TorchDispatchMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = getattr(func, "_overloadpacket", func)
        if getattr(packet, "__name__", "") in _SYNC_OPS:
            self.found.append(f"aten.{packet.__name__}")
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable[[], Any]) -> list[str]:
    """What `fn` does that would wait for a GPU: ATen ops that read values back (`.item()`,
    `float(t)`, `bool(t)`, nonzero, ...), and `Tensor.cpu` / `.tolist` / `.numpy` / `.to("cpu")`
    calls from Python. It runs on CPU tensors too, so a CUDA-only sync can be caught without
    a GPU; the backward counts (the dispatch mode follows autograd into it)."""
    found: list[str] = []
    names = (*_SYNC_METHODS, "to")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    own = {name: name in vars(torch.Tensor) for name in names}  # else inherited from C

    def recording(name: str) -> Callable[..., Any]:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            places = [t for t in (*args, kwargs.get("device")) if isinstance(t, str | torch.device)]
            if name != "to" or any(str(t).startswith("cpu") for t in places):
                found.append(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)

        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, recording(name))
        with _SyncOps(found):
            fn()
    finally:
        for name in names:
            if own[name]:
                setattr(torch.Tensor, name, originals[name])
            else:
                delattr(torch.Tensor, name)
    return found


def fused_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A fused training step's forward and backward on `x`, then an inference forward."""

    def step() -> None:
        module.train()
        out = module(x)
        if out.grad_fn is None or out.grad_fn.name() != "FusedCBAMBackward":
            raise AssertionError(f"the fused path did not run ({out.grad_fn})")
        out.backward(torch.ones_like(out))
        module.eval()
        with torch.no_grad():
            module(x)

    return step


def sync_free_modules(device: torch.device) -> dict[str, Callable[[], None]]:
    """The fused module and block steps that `host_syncs` (and CUDA's sync debug mode) watch."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 7, 7, device=device, requires_grad=True)
    return {
        "module": fused_step(CBAM(32).to(device), x),
        "block": fused_step(Bottleneck(32, 8, attention=CBAM).to(device), x),
    }


# --------------------------------------------------------------------------- deterministic


def check_deterministic(device: torch.device) -> dict[str, Any]:
    """Deterministic mode as documented: on CPU the fused path stays on, off the CPU the
    reference runs (the fused backward scatters with atomics there); either way two backward
    passes give identical gradients."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 32, 7, 7, device=device)
        paths = {}
        for name, module in (("module", CBAM(32)), ("block", Bottleneck(32, 8, attention=CBAM))):
            module = randomise(module).to(device)
            grads = []
            for _ in range(2):
                xi = x.clone().requires_grad_()
                out = module(xi)
                out.backward(torch.ones_like(out))
                grads.append(xi.grad)
            fused = out.grad_fn.name() == "FusedCBAMBackward"
            if fused != (device.type == "cpu"):
                ran = "the fused path" if fused else "the reference"
                raise AssertionError(f"{name}: deterministic mode on {device.type} ran {ran}")
            if not torch.equal(grads[0], grads[1]):
                raise AssertionError(f"{name}: two backward passes differ in deterministic mode")
            paths[name] = "fused" if fused else "reference"
        return paths
    finally:
        torch.use_deterministic_algorithms(previous)


def check_compiled(device: torch.device) -> float:
    """torch.compile of the fused layer against eager, forward and backward (fp32): the
    worst error over max |eager|."""
    torch.manual_seed(0)
    eager = randomise(CBAM(32)).to(device).train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x = torch.randn(4, 32, 14, 14, device=device)
    grad = torch.randn_like(x)
    expected = _run(eager, x, grad, "train")
    actual = _run(compiled, x, grad, "train")
    worst = max(_error(a, e, torch.float32) for a, e in zip(actual, expected, strict=True))
    if worst > 1e-5:
        raise AssertionError(f"compiled fused CBAM differs from eager by {worst:.3g}")
    return worst
