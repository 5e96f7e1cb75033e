"""The fused CBAM's speed machinery, behind the few names below: all that `cbam.layers` uses.

- `fused_cbam.py`: the module, and a residual block's tail, as one autograd function each,
  with a hand-written backward (the ATen path, which runs everywhere);
- `native_cbam.py` + `csrc/cbam_cpu.cpp`: the CPU kernels it calls for the paper's variant
  (built on first use; also registered as torch ops for `torch.compile`);
- `triton_cbam.py`: Triton kernels for its CUDA forward (opt-in, unmeasured on GPU);
- `_argmax.py`: max with argmax in both memory formats, fast on CPU;
- `_hooks.py`: whether a hook would see inside a module (then the fused path must not run).

The paper's modules live in `cbam.layers` and know nothing of this package beyond this entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cbam.kernels import native_cbam, triton_cbam
from cbam.kernels._hooks import has_hooks
from cbam.kernels.fused_cbam import (
    FUSED_ORDERS,
    FUSED_POOL_TYPES,
    batch_norm_settings,
    fused_unsupported_reason,
)
from cbam.kernels.fused_cbam import fused_cbam as forward
from cbam.kernels.fused_cbam import fused_cbam_residual as block_tail

__all__ = [
    "FUSED_ORDERS",
    "FUSED_POOL_TYPES",
    "autocast_off",
    "batch_norm_settings",
    "block_tail",
    "disabled",
    "forward",
    "fused_applies",
    "fused_unsupported_reason",
    "has_hooks",
]


def fused_applies(x: torch.Tensor) -> bool:
    """Whether the fused path may run on `x` in the current context: not while tracing,
    exporting or counting shapes (those want the reference graph), and not in deterministic
    mode off the CPU (its backward scatters with atomics there). Under autocast it runs in
    the map's own dtype (`autocast_off`)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    device = x.device.type
    if device == "meta" or torch.compiler.is_exporting():
        return False
    return device == "cpu" or not torch.are_deterministic_algorithms_enabled()


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """The context the fused path runs in: under autocast, autocast off, so the kernels keep
    the map in the dtype autocast gave it (bf16 / fp16 loads and stores, fp32 accumulation of
    the pools, the MLP, the spatial conv and BatchNorm, with the fp32 parameters) instead of
    having their small ops recast one by one; elsewhere nothing."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the fused path's ATen implementation inside this block, with the CPU and Triton
    kernels off: what the kernels buy, measured in the same run (`cbam bench`)."""
    triton_before = triton_cbam.enabled()
    triton_cbam.set_enabled(False)
    try:
        with native_cbam.disabled():
            yield
    finally:
        triton_cbam.set_enabled(triton_before)
