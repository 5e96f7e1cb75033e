"""Top-1 / top-5 error (the paper's metrics), loss, throughput and per-class accuracy."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbam.training.distributed import Dist, all_reduce_sum


@dataclass
class EvalMetrics:
    loss: float
    top1_err: float  # percent
    top5_err: float  # percent
    per_class_acc: list[float]  # percent, one per class
    images: int
    images_per_s: float
    skipped: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def top_k_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample 0/1: is the label among the k highest logits (k capped at #classes)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    dist_info: Dist | None = None,
) -> EvalMetrics:
    """Evaluate on this process's share of the batches; sums are reduced over all ranks."""
    dist_info = dist_info or Dist()
    was_training = model.training
    model.eval()
    # loss sum, top-1 hits, top-5 hits, images, skipped; then per-class hits and counts
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    class_hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
    class_counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    start = time.perf_counter()
    for images, labels, skipped in batches:
        totals[4] += skipped
        if labels.numel() == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top1 = top_k_correct(logits, labels, 1)
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += top1.sum()
        totals[2] += top_k_correct(logits, labels, 5).sum()
        totals[3] += labels.numel()
        class_hits.index_add_(0, labels, top1.double())
        class_counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    elapsed = time.perf_counter() - start
    for tensor in (totals, class_hits, class_counts):
        all_reduce_sum(tensor, dist_info)
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    per_class = (100 * class_hits / class_counts.clamp(min=1)).tolist()
    return EvalMetrics(
        loss=totals[0].item() / n,
        top1_err=100 * (1 - totals[1].item() / n),
        top5_err=100 * (1 - totals[2].item() / n),
        per_class_acc=per_class,
        images=int(totals[3].item()),
        images_per_s=totals[3].item() / max(elapsed, 1e-9),  # all ranks together
        skipped=int(totals[4].item()),
    )
