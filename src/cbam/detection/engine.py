"""Train and evaluate detectors: `train_detector(load_detect_config("small", {...}))`.

The run folder is laid out as `cbam train`'s: config.yaml, metrics.csv (one row per epoch:
the losses, the 12 COCO stats, VOC07 mAP@.5, speed, skipped data), TensorBoard events in
tb/, checkpoints/ + last.safetensors (resumable, written atomically at the end of each
epoch and on SIGINT/SIGTERM), best.safetensors (highest mAP@[.5,.95]). The loop runs under
torchrun as DistributedDataParallel; evaluation splits the test images over the ranks and
gathers the detections.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from torchvision.models.detection import FasterRCNN

from cbam._device import resolve_device
from cbam.complexity import count_parameters
from cbam.detection.config import DetectConfig, load_detect_config
from cbam.detection.data import DetectionData, build_detection_data, collate_detection
from cbam.detection.evaluate import COCO_STATS, DetectionMetrics, evaluate_detector
from cbam.detection.model import build_detector, build_torchvision_detector
from cbam.interop import load_checkpoint
from cbam.training import checkpoint as ckpt
from cbam.training.config import save_config
from cbam.training.distributed import (
    Dist,
    all_reduce_sum,
    any_rank,
    average_buffers,
    setup,
    teardown,
)
from cbam.training.eval_run import resolve_source
from cbam.training.trainer import (
    EpochPass,
    TrainingDiverged,
    amp_dtype,
    append_metrics,
    lr_factor,
    prepare_run,
    start_epoch_pass,
    stop_on_signals,
)

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
# One-stage detectors (RetinaNet, FCOS, SSD) name the same parts so; FCOS's centerness is its
# objectness. A part a detector does not have (their RPN's) is logged as nan.
LOSS_ALIASES = {
    "classification": "loss_classifier", "bbox_regression": "loss_box_reg",
    "bbox_ctrness": "loss_objectness",
}  # fmt: skip
METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", *LOSS_NAMES, *COCO_STATS, "voc07_mAP_50",
    "train_images_per_s", "epoch_seconds", "eval_seconds", "skipped_images",
    "skipped_annotations", "params",
)  # fmt: skip


@dataclass
class DetectionResult:
    run_dir: Path
    epochs_done: int
    interrupted: bool
    best_map: float  # highest mAP@[.5,.95] of any epoch (a fraction)
    last: DetectionMetrics | None
    model: nn.Module


@dataclass
class LoadedDetector:
    """A trained detector ready to use, with its config and test data."""

    model: FasterRCNN  # in eval mode, on `device`
    config: DetectConfig
    data: DetectionData
    device: torch.device


def detector_from_config(
    config: DetectConfig, num_classes: int, load_backbone_weights: bool = True
) -> FasterRCNN:
    """The configured detector; load_backbone_weights=False when full detector weights will
    be loaded next (resume, evaluation), so the backbone file need not be there any more."""
    if config.model is not None:  # torchvision's detector, attached
        return build_torchvision_detector(  # type: ignore[return-value]
            config.model, config.attach, num_classes,
            detector_weights=config.detector_weights if load_backbone_weights else None,
            backbone_weights=config.backbone_weights if load_backbone_weights else None,
            attention_kwargs=config.attention_kwargs, min_size=config.min_size,
            max_size=config.max_size,
        )  # fmt: skip
    frozen_bn = config.frozen_bn
    if frozen_bn is None:  # as build_backbone decides it when the weights are loaded
        frozen_bn = config.backbone_weights is not None
    return build_detector(
        config.backbone, config.attention, num_classes,
        attention_kwargs=config.attention_kwargs,
        backbone_weights=config.backbone_weights if load_backbone_weights else None,
        trainable_layers=config.trainable_layers, frozen_bn=frozen_bn,
        fpn_channels=config.fpn_channels, min_size=config.min_size, max_size=config.max_size,
        anchor_sizes=config.anchor_sizes, representation_size=config.representation_size,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_batch_size_per_image=config.box_batch_size_per_image,
        rpn_pre_nms_top_n_train=config.rpn_proposals_train,
        rpn_post_nms_top_n_train=config.rpn_proposals_train,
        rpn_pre_nms_top_n_test=config.rpn_proposals_test,
        rpn_post_nms_top_n_test=config.rpn_proposals_test,
    )  # fmt: skip


def train_detector(
    config: DetectConfig,
    resume: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> DetectionResult:
    """Train `config` (or resume the run in `resume`, with execution-only `overrides`:
    epochs, workers, device, log_every). `on_step(global_step, model)` runs after every
    optimizer step."""
    dist_info, device = setup(config.device)
    try:
        config, run_dir, found = prepare_run(config, resume, overrides, load_detect_config)
        return _train(config, run_dir, found, dist_info, device, on_step)
    finally:
        teardown()


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]


def _train(
    config: DetectConfig,
    run_dir: Path,
    found: ckpt.Resumable | None,
    dist_info: Dist,
    device: torch.device,
    on_step: Callable[[int, nn.Module], None] | None,
) -> DetectionResult:
    state = found.state if found is not None else None
    main = dist_info.is_main
    log = print if main else (lambda *a, **k: None)
    torch.set_flush_denormal(config.flush_denormal)  # process-wide; a no-op where unsupported
    dtype = amp_dtype(config.amp, device)

    # ---- data ---------------------------------------------------------------------------
    data = build_detection_data(config)
    assert data.train is not None
    world = dist_info.world_size
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide by {world} processes")
    per_rank_batch = config.batch_size // world
    sampler = DistributedSampler(
        data.train, num_replicas=world, rank=dist_info.rank, shuffle=True, seed=config.seed
    )
    steps_per_epoch = len(sampler) // per_rank_batch  # drop_last: every step is full
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(data.train)} training images make no full step of batch "
            f"{config.batch_size}; lower the batch size"
        )
    # Loaders get their own generators: Faster R-CNN samples anchors and proposals from the
    # global one, whose stream must not depend on where a resumed run starts its loader.
    test_loader = DataLoader(
        Subset(data.test, range(dist_info.rank, len(data.test), world)),
        batch_size=per_rank_batch, num_workers=config.workers, collate_fn=collate_detection,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip

    # ---- model, optimizer, schedule -----------------------------------------------------
    torch.manual_seed(config.seed)
    model = detector_from_config(config, data.num_classes, load_backbone_weights=state is None)
    backbone = model.backbone
    if hasattr(backbone, "frozen_bn"):  # ours (torchvision's detectors decide it themselves)
        # Save what build_backbone resolved, so resume and evaluation rebuild this very model.
        config = replace(
            config, trainable_layers=backbone.trainable_layers, frozen_bn=backbone.frozen_bn
        )
    model.to(device)
    params = count_parameters(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trained, lr=config.scaled_lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, config)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, start_batch, step, best = 0, 0, 0, -math.inf
    if found is not None and state is not None:
        load_checkpoint(model, found.weights, source="cbam")
        ckpt.restore_loop_state(state, optimizer, scheduler, scaler)
        start_epoch, start_batch = state["epoch"], state["batch_in_epoch"]
        step, best = state["step"], state["best_map"]
    net: nn.Module = model
    if dist_info.enabled:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- logging ------------------------------------------------------------------------
    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step if state else None)
        log(
            f"{config.description}: "
            f"{params / 1e6:.2f}M params ({sum(p.numel() for p in trained) / 1e6:.2f}M trained"
            f"{', frozen BN' if config.frozen_bn else ''}) | {config.dataset}: "
            f"{len(data.train)} train / {len(data.test)} test images, "
            f"{data.num_classes - 1} classes | {steps_per_epoch} steps/epoch x {config.epochs} "
            f"epochs | batch {config.batch_size} on {world} x {device.type} | lr "
            f"{config.scaled_lr:g} | run folder {run_dir}"
            + (f" | resuming at epoch {start_epoch + 1}, step {step}" if state else "")
        )
        for report in data.reports:
            log(report.summary())

    def save_checkpoint(
        epoch: int, batch_in_epoch: int, totals: torch.Tensor | None = None,
        seconds: float = 0.0,
    ) -> None:  # fmt: skip
        average_buffers(model, dist_info)  # collective: every rank calls it
        if not main:
            return
        ckpt.save_checkpoint(
            run_dir,
            model,
            {
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "best_map": best,
                "epoch_totals": totals.cpu() if totals is not None else torch.zeros(8),
                "epoch_seconds": seconds,
                **ckpt.loop_state(optimizer, scheduler, scaler),
            },
        )

    # ---- the loop -----------------------------------------------------------------------
    last: DetectionMetrics | None = None
    with stop_on_signals() as signals:
        for epoch in range(start_epoch, config.epochs):
            data.train.set_epoch(epoch)
            skip = start_batch if epoch == start_epoch else 0
            net.train()
            # totals: loss sum, the four loss terms' sums, steps, images, skipped images
            generator = torch.Generator().manual_seed(config.seed + epoch)
            source = EpochPass(
                data.train, sampler, per_rank_batch, config.workers, collate_detection, generator
            )
            bar, totals, t0 = start_epoch_pass(
                source, epoch, config.epochs, skip, steps_per_epoch, 8, state, main, device
            )
            for batch_in_epoch, (images, targets, n_skipped) in enumerate(bar, start=skip + 1):
                totals[7] += n_skipped
                if not images:
                    continue
                images = [image.to(device, non_blocking=True) for image in images]
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    losses = net(images, _to_device(targets, device))
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; stopped "
                        f"without saving, so {run_dir / 'last.safetensors'} is still the last "
                        f"good checkpoint. Try a lower --lr or a longer warm-up "
                        f"(--set warmup_epochs=1)"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                totals[0] += loss.detach()
                named = {LOSS_ALIASES.get(k, k): v.detach() for k, v in losses.items()}
                for i, name in enumerate(LOSS_NAMES, start=1):
                    totals[i] += named.get(name, math.nan)
                totals[5] += 1
                totals[6] += len(images)
                if main and step % config.log_every == 0:
                    rate = totals[6].item() * world / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}")
                    writer.add_scalar("train/loss", loss.item(), step)  # type: ignore[union-attr]
                if on_step is not None:
                    on_step(step, model)
                if any_rank((signals["stop"],), dist_info, device)[0]:
                    partial = all_reduce_sum(totals.clone(), dist_info)
                    save_checkpoint(epoch, batch_in_epoch, partial, time.perf_counter() - t0)
                    log(f"stopped at epoch {epoch + 1}, step {step}; resume: --resume {run_dir}")
                    return DetectionResult(run_dir, epoch, True, best, last, model)
            bar.close()
            seconds = time.perf_counter() - t0
            average_buffers(model, dist_info)
            eval_start = time.perf_counter()
            last = evaluate_detector(
                model, test_loader, data.test_coco, data.category_ids, device, dtype, dist_info
            )
            eval_seconds = time.perf_counter() - eval_start
            if dist_info.enabled:
                torch.distributed.all_reduce(totals)
            improved = last.coco["mAP"] > best
            best = max(best, last.coco["mAP"])
            start_batch = 0
            save_checkpoint(epoch + 1, 0)
            if main:
                if improved:
                    ckpt.save_weights(model, run_dir / "best.safetensors", {"step": str(step)})
                steps = max(totals[5].item(), 1.0)
                row = {
                    "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                    "train_loss": totals[0].item() / steps,
                    **{name: totals[i].item() / steps for i, name in enumerate(LOSS_NAMES, 1)},
                    **last.coco, "voc07_mAP_50": last.voc07_map50,
                    "train_images_per_s": totals[6].item() / seconds, "epoch_seconds": seconds,
                    "eval_seconds": eval_seconds,
                    "skipped_images": data.skipped_images + int(totals[7].item()) + last.skipped,
                    "skipped_annotations": data.skipped_annotations, "params": params,
                }  # fmt: skip
                append_metrics(run_dir / "metrics.csv", row, METRIC_COLUMNS)
                for key in ("train_loss", *LOSS_NAMES):
                    writer.add_scalar(f"train/{key}", row[key], step)  # type: ignore[union-attr]
                for key in (*COCO_STATS[:6], "voc07_mAP_50"):
                    writer.add_scalar(f"test/{key}", row[key], step)  # type: ignore[union-attr]
                writer.flush()  # type: ignore[union-attr]
                log(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f} | "
                    f"{format_metrics(last)} | {row['train_images_per_s']:.1f} img/s, "
                    f"{seconds:.0f}s + eval {eval_seconds:.0f}s"
                )
    if writer is not None:
        writer.close()
    return DetectionResult(run_dir, config.epochs, False, best, last, model)


def format_metrics(metrics: DetectionMetrics) -> str:
    """The paper's figures, in percent: mAP@[.5,.95], mAP@.5, mAP@.75, then VOC07 mAP@.5."""
    c = metrics.coco
    return (
        f"mAP@[.5,.95] {100 * c['mAP']:.1f}, mAP@.5 {100 * c['mAP_50']:.1f}, "
        f"mAP@.75 {100 * c['mAP_75']:.1f} | VOC07 mAP@.5 {100 * metrics.voc07_map50:.1f}"
    )


def load_detection_run(
    source: str | Path, weights: str = "best", overrides: dict[str, Any] | None = None
) -> LoadedDetector:
    """Rebuild a trained detector from a run folder (its config.yaml, and best or last
    weights) or a .safetensors file of `detector.state_dict()` plus overrides (backbone,
    attention, dataset, ...; the small recipe otherwise). Overrides also change
    evaluation-only settings of a run (data_dir, device, workers, batch_size, test_subset,
    strict, amp)."""
    config, weights_file, _ = resolve_source(source, weights, overrides, load_detect_config)
    device = resolve_device(config.device)
    torch.set_flush_denormal(config.flush_denormal)
    data = build_detection_data(config, train=False)
    model = detector_from_config(config, data.num_classes, load_backbone_weights=False)
    load_checkpoint(model, weights_file, source="cbam")
    return LoadedDetector(model.to(device).eval(), config, data, device)


def evaluate_detection_run(
    source: str | Path, weights: str = "best", overrides: dict[str, Any] | None = None
) -> tuple[DetectionMetrics, DetectConfig]:
    """(metrics, config) of a run folder or weights file on its test split; arguments as for
    `load_detection_run`."""
    run = load_detection_run(source, weights, overrides)
    loader = DataLoader(
        run.data.test, batch_size=run.config.batch_size, num_workers=run.config.workers,
        collate_fn=collate_detection,
    )  # fmt: skip
    metrics = evaluate_detector(
        run.model, loader, run.data.test_coco, run.data.category_ids, run.device,
        amp_dtype(run.config.amp, run.device),
    )  # fmt: skip
    return metrics, run.config
