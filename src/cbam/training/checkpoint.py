"""Run-folder checkpoints that survive what kills a job: kill -9, a full disk, a bad copy.

A checkpoint is three files in `checkpoints/`, named by step, epoch and batch: the weights
(safetensors), the training state (tensors and plain containers only, so it loads with
weights_only=True), and a manifest with both files' sizes and SHA-256, written last. A
checkpoint without a manifest that matches was never finished, or was damaged since; a
resume skips it for the one before. The newest `KEEP` checkpoints stay, so the previous one
is kept until the next is complete, and `last.safetensors` in the run folder is the newest
weights (a hard link, or a copy where links are not supported) for `cbam eval` and friends.
Run folders written before checkpoints/ existed hold last.safetensors + last_state.pt; they
still resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

CHECKPOINTS = "checkpoints"
KEEP = 2
LAST_WEIGHTS = "last.safetensors"
LEGACY_STATE = "last_state.pt"


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, folder not writable); the ones written
    before it are intact."""


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


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def manifests(run_dir: Path) -> list[Path]:
    """The run's checkpoint manifests, newest first (their names sort by step, epoch, batch)."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob("step*.json"), reverse=True)


def _link_or_copy(target: Path, alias: Path) -> None:
    tmp = alias.with_name(f".{alias.name}.new")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # no hard links on this file system
        shutil.copyfile(target, tmp)
    os.replace(tmp, alias)


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of unfinished writes."""
    kept = {m.stem for m in sorted(folder.glob("step*.json"), reverse=True)[:keep]}
    for path in folder.iterdir():  # "STEM.json", or ".STEM.json.XXXX.tmp" left by a crash
        if path.name.lstrip(".").split(".")[0] not in kept:
            path.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write a checkpoint (model weights + `state`, which holds step, epoch, batch_in_epoch)
    and make it the run's newest; returns its manifest.

    An OSError on the way (ENOSPC, EACCES, ...) removes what this call wrote and raises
    CheckpointWriteError, which names the folder and the space a checkpoint needs.
    """
    folder = Path(run_dir) / CHECKPOINTS
    stem = f"step{state['step']:09d}-epoch{state['epoch']:04d}-batch{state['batch_in_epoch']:06d}"
    weights, training, manifest = (folder / f"{stem}{s}" for s in (".safetensors", ".pt", ".json"))
    if manifest.is_file() and damage(manifest) is None:  # saved at this very point already
        return manifest
    tensors = model_state(model)
    written: list[Path] = []
    committed = False
    try:
        for path, write in (
            (weights, lambda tmp: save_file(tensors, tmp, metadata={"step": str(state["step"])})),
            (training, lambda tmp: torch.save(state, tmp)),
        ):
            written.append(path)
            atomic_write(path, write)
        record = {
            "step": state["step"], "epoch": state["epoch"],
            "batch_in_epoch": state["batch_in_epoch"],
            "files": {"weights": _describe(weights), "state": _describe(training)},
        }  # fmt: skip
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        committed = True
        _link_or_copy(weights, Path(run_dir) / LAST_WEIGHTS)
    except OSError as error:
        if not committed:
            for path in written:
                path.unlink(missing_ok=True)
        needed = _tensor_bytes(tensors) + _tensor_bytes(state)
        free = shutil.disk_usage(folder if folder.exists() else Path(run_dir).parent).free
        newest = manifests(run_dir)
        raise CheckpointWriteError(
            f"could not write checkpoint {stem} in {folder}: {error.strerror or error}. A "
            f"checkpoint needs about {needed / 1e6:.0f} MB there ({free / 1e6:.0f} MB free). "
            + (f"The newest complete checkpoint, {newest[0].stem}, is intact: " if newest else "")
            + f"free some space or make the folder writable, then resume with --resume {run_dir}"
        ) from None
    _prune(folder, KEEP)
    return manifest


def damage(manifest: Path) -> str | None:
    """What is wrong with a checkpoint, or None when its files match its manifest."""
    try:
        record = json.loads(manifest.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest is unreadable ({error})"
    for entry in files.values():
        path = manifest.parent / entry["name"]
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path.name} has {path.stat().st_size} bytes, not the {entry['bytes']} written"
        if _sha256(path) != entry["sha256"]:
            return f"{path.name} does not match the SHA-256 recorded when it was written"
    return None


@dataclass(frozen=True)
class Resumable:
    """A checkpoint to resume from: its training state and weights file."""

    state: dict[str, Any]
    weights: Path
    name: str


def newest_complete(run_dir: Path, fall_back: bool) -> Resumable | None:
    """The newest undamaged checkpoint in `run_dir`, or None when there is none.

    A damaged newest checkpoint is an error, unless `fall_back`, which skips it with a
    warning for the one before (what `--resume auto` does)."""
    found = manifests(run_dir)
    for i, manifest in enumerate(found):
        problem = damage(manifest)
        if problem is None:
            files = json.loads(manifest.read_text())["files"]
            state = read_training_state(manifest.parent / files["state"]["name"])
            return Resumable(state, manifest.parent / files["weights"]["name"], manifest.stem)
        older = found[i + 1].stem if i + 1 < len(found) else None
        if not fall_back:
            raise ValueError(
                f"the newest checkpoint in {run_dir}, {manifest.stem}, is damaged: {problem}; "
                + (
                    f"`--resume auto` skips it for the previous one ({older})"
                    if older
                    else "there is no older checkpoint to fall back to"
                )
            )
        warnings.warn(
            f"skipping damaged checkpoint {manifest.stem} in {run_dir} ({problem}); "
            + (f"resuming from {older}" if older else "no older checkpoint is left"),
            stacklevel=2,
        )
    if not found and (Path(run_dir) / LEGACY_STATE).is_file():
        return _legacy(Path(run_dir))
    return None


def _legacy(run_dir: Path) -> Resumable:
    state = read_training_state(run_dir / LEGACY_STATE)
    weights_step = read_metadata(run_dir / LAST_WEIGHTS).get("step")
    if weights_step != str(state["step"]):
        raise ValueError(
            f"{run_dir}: {LAST_WEIGHTS} (step {weights_step}) and {LEGACY_STATE} (step "
            f"{state['step']}) disagree; the run folder was modified or a write was cut off"
        )
    return Resumable(state, run_dir / LAST_WEIGHTS, LEGACY_STATE)


def progress(run_dir: Path) -> tuple[int, int] | None:
    """(epoch, batch_in_epoch) of the newest checkpoint, as recorded; None without one."""
    found = manifests(run_dir)
    if found:
        try:
            record = json.loads(found[0].read_text())
            return record["epoch"], record["batch_in_epoch"]
        except (OSError, ValueError, KeyError):
            return None
    if (Path(run_dir) / LEGACY_STATE).is_file():
        state = read_training_state(Path(run_dir) / LEGACY_STATE)
        return state["epoch"], state["batch_in_epoch"]
    return None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything to resume from (checked in full when resuming)."""
    return bool(manifests(run_dir)) or (Path(run_dir) / LEGACY_STATE).is_file()


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
