"""The one place a device name from the user becomes a torch.device, checked up front: a
typo or a GPU the machine does not have is a clear ValueError before any work starts, not a
driver traceback minutes into a run."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" (CUDA when usable, else CPU), "cpu", "cuda", "cuda:N", "mps", ...; ValueError
    naming the fix when the name is not a device or the machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {name!r}; use auto, cpu, cuda or cuda:N (a GPU's index)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: this machine has no usable CUDA GPU "
                f"(torch.cuda.is_available() is False); use --device cpu, or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: cbam runs on cpu, cuda or mps")
    return device
