"""Run-folder checkpoints: weights as safetensors, training state in a separate file.
(Reading weights back goes through `cbam.interop.load_checkpoint`, which checks them all.)

Both files are written to a temporary name and renamed into place, so a crash leaves the
previous checkpoint intact. The two carry the same step number, checked when resuming.
The state file holds only tensors and plain containers: it loads with weights_only=True.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename tmp over `path` (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, contiguous and detached, as safetensors wants them."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = model_state(model)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def save_training_state(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"training state {path} does not exist") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable training state ({error})") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a .safetensors file (we store the step number there)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise ValueError(f"weights file {path} does not exist") from None
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable .safetensors file ({error})") from None


def loop_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """What a training loop needs besides the weights to resume exactly: optimizer, schedule,
    grad scaler and the random number generators."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_loop_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Undo `loop_state`: put the saved optimizer, schedule, scaler and RNG states back."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])
