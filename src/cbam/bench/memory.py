"""Peak memory of one call, on CPU as on CUDA.

CUDA keeps allocator statistics (`torch.cuda.max_memory_allocated`); the CPU allocator does
not. On CPU we run the call once under `torch.profiler` with `profile_memory=True`, which
records every allocation and free of PyTorch's CPU allocator with its size, in order. The
running sum of those events is the memory held above the level before the call; its maximum is
the call's peak increment. Add the bytes already live before the call (the model's parameters,
buffers, gradients and optimizer state, and the batch: `tensor_bytes`) to get the peak. This
counts tensor storage only: not the Python heap, not allocator slack, not oneDNN's scratch
buffers where it allocates them itself, which are the same for every variant.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def tensor_bytes(objects: Iterable[Any]) -> int:
    """Bytes of the distinct storages among tensors in `objects` (tensors, or nested lists,
    tuples and dicts of them, such as an optimizer's state)."""
    seen: set[int] = set()
    total = 0
    stack = list(objects)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes held during `fn()` above the level before it (the profiler's allocation
    events on CPU; the allocator's statistics on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # Kineto logs every start and stop on stderr
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = [
        e
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: C++ logging bypasses Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
