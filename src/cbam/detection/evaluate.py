"""Detection metrics: pycocotools' COCOeval (the paper's mAP@[.5,.95], mAP@.5, mAP@.75 and
the per-size figures) and Pascal VOC 2007's 11-point mAP@.5, from the same detections."""

from __future__ import annotations

import contextlib
import io
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.ops import box_iou

from cbam.training.distributed import Dist, all_reduce_sum, gather_objects

# COCOeval.stats, in its order: AP and AR averaged over IoU .50:.05:.95 unless named.
COCO_STATS = (
    "mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
VOC07_RECALLS = np.linspace(0, 1, 11)


@dataclass
class DetectionMetrics:
    """COCO stats by name (fractions; -1 where a size range has no ground truth, as COCOeval
    reports it), VOC07 mAP@.5, and throughput."""

    coco: dict[str, float]
    voc07_map50: float
    images: int
    images_per_s: float
    skipped: int
    detections: int
    summary: str  # COCOeval's own printed table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def coco_results(
    coco_gt: COCO, detections: Sequence[dict[str, Any]]
) -> tuple[COCO, dict[str, float], str]:
    """(results index, the 12 COCOeval bbox stats by name, COCOeval's printed summary).

    detections: COCO result dicts {image_id, category_id, bbox: [x, y, w, h], score}."""
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes edits them
    else:  # loadRes cannot take an empty list; no detections scores 0 wherever there is GT
        coco_dt = COCO()
        coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # progress lines
        evaluator.evaluate()
        evaluator.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the table of the 12 stats
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats, strict=True)}
    return coco_dt, stats, printed.getvalue()


def coco_metrics(coco_gt: COCO, detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The 12 COCOeval bbox stats by name (see COCO_STATS) for these detections."""
    return coco_results(coco_gt, detections)[1]


def voc07_map(coco_gt: COCO, detections: Sequence[dict[str, Any]], iou: float = 0.5) -> float:
    """Pascal VOC 2007's metric: per category, 11-point interpolated AP at IoU >= `iou`;
    the mean over categories that have ground truth.

    As VOC's devkit does, each detection is matched to the ground-truth box it overlaps most
    in its image; crowd / difficult boxes are neither hits nor misses, and a second detection
    of an already-matched box is a false positive."""
    by_category: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for det in detections:
        by_category[det["category_id"]].append(det)
    aps = []
    for category in coco_gt.getCatIds():
        truth: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        positives = 0
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[category])):
            boxes, ignore = truth.get(ann["image_id"], (torch.empty(0, 4), torch.empty(0)))
            x, y, w, h = ann["bbox"]
            truth[ann["image_id"]] = (
                torch.cat([boxes, torch.tensor([[x, y, x + w, y + h]])]),
                torch.cat([ignore, torch.tensor([float(ann["iscrowd"])])]),
            )
            positives += not ann["iscrowd"]
        if positives == 0:
            continue
        dets = sorted(by_category[category], key=lambda d: -d["score"])
        matched = {image: torch.zeros(len(b), dtype=torch.bool) for image, (b, _) in truth.items()}
        hits = []
        for det in dets:
            boxes, ignore = truth.get(det["image_id"], (torch.empty(0, 4), torch.empty(0)))
            if len(boxes) == 0:
                hits.append(0)
                continue
            x, y, w, h = det["bbox"]
            overlaps = box_iou(torch.tensor([[x, y, x + w, y + h]]), boxes)[0]
            best = int(overlaps.argmax())
            if overlaps[best] < iou:
                hits.append(0)
            elif ignore[best]:
                continue  # a difficult / crowd box: not counted either way
            elif matched[det["image_id"]][best]:
                hits.append(0)
            else:
                matched[det["image_id"]][best] = True
                hits.append(1)
        tp = np.cumsum(hits)
        fp = np.cumsum([1 - h for h in hits])
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        reached = [precision[recall >= t] for t in VOC07_RECALLS]
        aps.append(np.mean([p.max() if p.size else 0.0 for p in reached]))
    return float(np.mean(aps)) if aps else float("nan")


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    batches: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]], int]],
    coco_gt: COCO,
    category_ids: Sequence[int],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    dist_info: Dist | None = None,
) -> DetectionMetrics:
    """Run the detector over this process's share of the test batches, gather every rank's
    detections, and score them against `coco_gt` (category_ids[label - 1] names a label)."""
    dist_info = dist_info or Dist()
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # images, skipped
    start = time.perf_counter()
    for images, targets, skipped in batches:
        counts[1] += skipped
        if not images:
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model([image.to(device, non_blocking=True) for image in images])
        counts[0] += len(images)
        for target, output in zip(targets, outputs, strict=True):
            boxes = output["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # x0, y0, x1, y1 -> x, y, w, h
            for box, label, score in zip(
                boxes.tolist(), output["labels"].tolist(), output["scores"].float().tolist(),
                strict=True,
            ):  # fmt: skip
                detections.append({
                    "image_id": target["image_id"], "category_id": category_ids[label - 1],
                    "bbox": box, "score": score,
                })  # fmt: skip
    elapsed = time.perf_counter() - start
    all_reduce_sum(counts, dist_info)
    model.train(was_training)
    detections = gather_objects(detections, dist_info)
    _, stats, summary = coco_results(coco_gt, detections)
    return DetectionMetrics(
        coco=stats,
        voc07_map50=voc07_map(coco_gt, detections),
        images=int(counts[0].item()),
        images_per_s=counts[0].item() / max(elapsed, 1e-9),
        skipped=int(counts[1].item()),
        detections=len(detections),
        summary=summary,
    )
