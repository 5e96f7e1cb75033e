"""Triton kernels for the fused CBAM's forward on CUDA: three passes over the feature map.

1. `hw_pool`: per (sample, channel), the mean, max and argmax over H x W in one read.
2. `channel_pool`: per position, the max, argmax and mean over C of x * Mc, without writing
   x * Mc (one read of x).
3. `gate`: x * Mc * Ms, or a block's relu(x * Mc * Ms + identity), in one read and write.

So the forward reads the map three times and writes it once, where the ATen ops read it six
times and write it three times. The backward stays in ATen (`fused_cbam.py`).

Status: correct in Triton's interpreter on CPU (`tests/test_fused_cbam.py` runs the kernels
with TRITON_INTERPRET=1 against PyTorch), but UNMEASURED ON GPU: no GPU was available while
writing them. They are therefore off by default; `CBAM_TRITON=1` in the environment (read at
import) or `set_enabled(True)` turns them on for contiguous NCHW CUDA tensors in the default
variant (avg + max pools, channel pooling, channel-then-spatial order). `make gpu-check`
checks and times them on one GPU in one prepared run (docs/performance.md).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None

_enabled = os.environ.get("CBAM_TRITON", "0") == "1"


def available() -> bool:
    return triton is not None


def enabled() -> bool:
    return _enabled


def set_enabled(enabled: bool) -> None:
    """Use the Triton kernels for eligible CUDA tensors (unmeasured on GPU; off by default)."""
    global _enabled
    _enabled = bool(enabled)


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels run on `x`: enabled, CUDA (or Triton's interpreter), NCHW."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (
        _enabled
        and triton is not None
        and (x.is_cuda or interpreting)
        and x.is_contiguous()
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not torch.compiler.is_compiling()
    )


if triton is not None:

    @triton.jit
    def _hw_pool_kernel(x_ptr, mean_ptr, max_ptr, idx_ptr, hw, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start_ptr = x_ptr + row.to(tl.int64) * hw
        total = tl.zeros([BLOCK], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, hw, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hw
            v = tl.load(start_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            total += tl.where(mask, v, 0.0)
            better = v > best  # strictly: each lane keeps its first maximum
            best_idx = tl.where(better, offs, best_idx)
            best = tl.where(better, v, best)
        row_max = tl.max(best, axis=0)
        # the first position among the lanes holding the maximum
        candidates = tl.where(best == row_max, best_idx, hw)
        tl.store(mean_ptr + row, tl.sum(total, axis=0) / hw)
        tl.store(max_ptr + row, row_max)
        tl.store(idx_ptr + row, tl.min(candidates, axis=0).to(tl.int64))

    @triton.jit
    def _channel_pool_kernel(x_ptr, mc_ptr, out_ptr, idx_ptr, channels, hw, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < hw
        sample = x_ptr + n.to(tl.int64) * channels * hw
        total = tl.zeros([BLOCK], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK], dtype=tl.int32)
        for c in range(0, channels):
            gate = tl.load(mc_ptr + n * channels + c).to(tl.float32)
            v = tl.load(sample + c * hw + offs, mask=mask, other=0.0).to(tl.float32) * gate
            total += v
            better = v > best
            best_idx = tl.where(better, c, best_idx)
            best = tl.where(better, v, best)
        out = out_ptr + n.to(tl.int64) * 2 * hw
        tl.store(out + offs, best, mask=mask)  # [max, mean], the authors' order
        tl.store(out + hw + offs, total / channels, mask=mask)
        tl.store(idx_ptr + n.to(tl.int64) * hw + offs, best_idx.to(tl.int64), mask=mask)

    @triton.jit
    def _gate_kernel(
        x_ptr, mc_ptr, ms_ptr, identity_ptr, out_ptr, channels, hw, total,
        HAS_IDENTITY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        nc = offs // hw
        n = nc // channels
        position = offs % hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mc = tl.load(mc_ptr + nc, mask=mask, other=0.0).to(tl.float32)
        ms = tl.load(ms_ptr + n * hw + position, mask=mask, other=0.0).to(tl.float32)
        y = x * mc * ms
        if HAS_IDENTITY:
            y += tl.load(identity_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.maximum(y, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int = 1024) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def hw_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, max, argmax) over H x W, each N x C (the argmax as h * W + w)."""
    n, c, h, w = x.shape
    mean = torch.empty(n, c, device=x.device, dtype=torch.float32)
    values = torch.empty(n, c, device=x.device, dtype=torch.float32)
    index = torch.empty(n, c, device=x.device, dtype=torch.int64)
    _hw_pool_kernel[(n * c,)](x, mean, values, index, h * w, BLOCK=_block(h * w))
    return mean.to(x.dtype), values.to(x.dtype), index


def channel_pool(x: torch.Tensor, mc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([max, mean] over C of x * Mc as N x 2 x H x W, argmax channel as N x 1 x H x W)."""
    n, c, h, w = x.shape
    out = torch.empty(n, 2, h, w, device=x.device, dtype=torch.float32)
    index = torch.empty(n, 1, h, w, device=x.device, dtype=torch.int64)
    block = _block(h * w, 256)
    grid = (n, triton.cdiv(h * w, block))
    _channel_pool_kernel[grid](x, mc.contiguous(), out, index, c, h * w, BLOCK=block)
    return out.to(x.dtype), index


def gate(
    x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor, identity: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x * Mc * Ms, or relu(x * Mc * Ms + identity), in one pass (into `out` if given, which
    may be x itself)."""
    _, c, h, w = x.shape
    out = torch.empty_like(x) if out is None else out
    total = x.numel()
    block = 1024
    identity_arg = identity.contiguous() if identity is not None else x
    _gate_kernel[(triton.cdiv(total, block),)](
        x, mc.contiguous(), ms.contiguous(), identity_arg, out, c, h * w, total,
        HAS_IDENTITY=identity is not None, BLOCK=block,
    )  # fmt: skip
    return out
