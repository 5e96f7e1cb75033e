"""Max with argmax over H x W or over C, fast in both memory formats on CPU.

`torch.max(x, dim)` with indices is a scalar loop on CPU, ~10x slower than `amax`; but
`max_pool2d` on a channels_last tensor is vectorised across channels and also returns indices.
So each reduction is written as a max-pool over a channels_last *view* whose channel axis is
the axis we keep, when the memory layout has that axis contiguous; otherwise a pool over the
outer part of the reduced axis, then a plain `max` over the (much smaller) rest, or for small
maps a channels_last copy. Where the maximum is not unique, the index is of one of the maximal
elements (not necessarily the first in flat order), which is all the backward of a max needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _split(c: int) -> tuple[int, int]:
    """c = outer * inner with both near sqrt(c) (inner = c for a prime)."""
    outer = max(d for d in range(1, math.isqrt(c) + 1) if c % d == 0)
    return outer, c // outer


def max_over_channels(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each N x 1 x H x W: the max of `u` over C and its channel."""
    n, c, h, w = u.shape
    if torch.compiler.is_compiling() or u.device.type != "cpu":
        return u.max(dim=1, keepdim=True)
    if _channels_last(u):  # C is contiguous: pool over its outer part, then max over the rest
        c1, c2 = _split(c)
        view = torch.as_strided(u, (n * h * w, c2, c1, 1), (c, 1, c2, c2))
        values, outer = F.max_pool2d(view, (c1, 1), return_indices=True)  # (nhw, c2, 1, 1)
        values, inner = values.view(n * h * w, c2).max(dim=1, keepdim=True)
        index = outer.view(n * h * w, c2).gather(1, inner) * c2 + inner
        values, index = values.view(n, h, w, 1), index.view(n, h, w, 1)
        return values.permute(0, 3, 1, 2), index.permute(0, 3, 1, 2)
    u = u.contiguous()  # H x W contiguous: a channels_last view with H x W as its channels
    c1, c2 = _split(c)
    view = torch.as_strided(u, (n, h * w, c1, c2), (c * h * w, 1, c2 * h * w, h * w))
    values, index = F.max_pool2d(view, (c1, c2), return_indices=True)  # index = c directly
    return values.view(n, 1, h, w), index.view(n, 1, h, w)


def max_over_hw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, flat h * W + w indices), each N x C: the max of `x` over H and W."""
    n, c, h, w = x.shape
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return x.flatten(2).max(dim=2)
    if _channels_last(x):  # C is contiguous: one pool over the whole map
        values, index = F.max_pool2d(x, (h, w), return_indices=True)
        return values.view(n, c), index.view(n, c)
    if h * w < 400:  # small maps: a channels_last copy and one pool beat the two steps below
        values, index = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last), (h, w), return_indices=True
        )
        return values.view(n, c), index.view(n, c)
    x = x.contiguous()  # W contiguous: pool over H keeping (C, W), then max over W
    view = torch.as_strided(x, (n * c, w, h, 1), (h * w, 1, w, w))
    values, rows = F.max_pool2d(view, (h, 1), return_indices=True)  # (nc, w, 1, 1), h index
    values, col = values.view(n * c, w).max(dim=1, keepdim=True)
    index = rows.view(n * c, w).gather(1, col) * w + col
    return values.view(n, c), index.view(n, c)
