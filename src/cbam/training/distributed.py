"""torchrun / DistributedDataParallel plumbing: which process am I, and on which device."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cbam._device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str, timeout_minutes: float = 15.0) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on
    CPU) and pick this process's device. A plain `python` launch is a world of one.

    A collective that waits longer than `timeout_minutes` (a peer died or hangs) raises
    instead of blocking the job forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(device)
    if world_size == 1:
        return Dist(), chosen
    info = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    on_cuda = chosen.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if on_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes)
        )
    return info, torch.device(f"cuda:{info.local_rank}" if on_cuda else "cpu")


class PeersLost(RuntimeError):
    """Another process of the job died or stopped answering."""


# What gloo and NCCL say when a peer's socket closed or a collective waited too long.
LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "timed out",
                   "Timed out", "Broken pipe")  # fmt: skip


@contextmanager
def peers_lost_message(info: Dist, run_dir: Path) -> Iterator[None]:
    """Turn a collective that failed because another process died, or timed out waiting for
    it, into one clear error on each survivor: the job then ends instead of hanging, and the
    message says how it continues."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        lost = isinstance(error, dist.DistError) or any(s in text for s in LOST_PEER_SIGNS)
        if not info.enabled or not lost:
            raise
        raise PeersLost(
            f"rank {info.rank} of {info.world_size} lost contact with the other processes "
            f"({text.splitlines()[0][:300]}); another worker probably died. Run the same "
            f"command with --resume auto (torchrun --max-restarts N does it for you) to "
            f"continue from the newest checkpoint in {run_dir}"
        ) from error


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flags: Sequence[bool], info: Dist, device: torch.device) -> tuple[bool, ...]:
    """Each flag, true on every rank if it is true on any rank (so all ranks stop, or save,
    at the same step); one collective for all of them."""
    if not info.enabled:
        return tuple(flags)
    summed = all_reduce_sum(torch.tensor([float(f) for f in flags], device=device), info)
    return tuple(bool(v > 0) for v in summed.tolist())


def average_buffers(model: torch.nn.Module, info: Dist) -> None:
    """Average floating-point buffers (BN running statistics) over ranks. Each rank's BN saw
    its own data, so without this rank 0's checkpoint would not be what the others hold."""
    if not info.enabled:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(info.world_size)


def gather_objects(items: list[Any], info: Dist) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank (e.g. detections)."""
    if not info.enabled:
        return items
    gathered: list[list[Any]] = [[] for _ in range(info.world_size)]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
