"""The training loop: `train(config)` runs (or resumes) one run in its own folder.

Run folder: config.yaml, metrics.csv, tb/ (TensorBoard), checkpoints/ (resumable; see
`checkpoint`), last.safetensors (the newest weights), best.safetensors (lowest test top-1
error). Checkpoints are written at the end of each epoch, every `checkpoint_every` steps or
`checkpoint_minutes`, and when SIGINT/SIGTERM arrives, at the next optimizer step.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cbam.complexity import count_parameters
from cbam.data import DataSplits, build_datasets, collate_skipping, split_batches
from cbam.interop import load_checkpoint
from cbam.interop.external import create_external, is_external
from cbam.models import create_model
from cbam.training import checkpoint as ckpt
from cbam.training.config import TrainConfig, load_config, save_config
from cbam.training.distributed import (
    Dist,
    all_reduce_sum,
    any_rank,
    average_buffers,
    peers_lost_message,
    setup,
    teardown,
)
from cbam.training.evaluate import EvalMetrics, evaluate

METRIC_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_top1_err", "test_loss", "test_top1_err",
    "test_top5_err", "train_images_per_s", "epoch_seconds", "skipped_images", "params",
)  # fmt: skip
# What a resumed run may change: how it executes, and how long it trains.
RESUMABLE_OVERRIDES = {
    "epochs", "workers", "device", "log_every", "checkpoint_every", "checkpoint_minutes",
    "dist_timeout_minutes",
}  # fmt: skip
AUTO = "auto"  # resume="auto": the newest complete checkpoint in the output folder, if any


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class RunFinished(ValueError):
    """The run to resume has trained all its epochs (`--resume auto` then has nothing to do)."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted: bool
    best_top1_err: float
    last: EvalMetrics | None
    model: nn.Module


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    if amp is None:
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 AMP needs a CUDA device; on CPU use amp: bf16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


class ScheduleConfig(Protocol):
    """The config fields `lr_factor` reads (TrainConfig and detection's DetectConfig)."""

    epochs: int
    schedule: str
    step_epochs: int | list[int]
    step_gamma: float
    warmup_epochs: float


class RunLike(Protocol):
    """The config fields `prepare_run` reads."""

    output: str
    epochs: int

    def to_dict(self) -> dict[str, Any]: ...


RunConfig = TypeVar("RunConfig", bound=RunLike)


def lr_factor(step: int, steps_per_epoch: int, config: ScheduleConfig) -> float:
    """Warm-up (linear from 0), then the schedule, as a multiple of the scaled lr.

    "step" decays by step_gamma every step_epochs epochs, or at each epoch of a list."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "step":
        epoch = step // steps_per_epoch
        if isinstance(config.step_epochs, int):
            return config.step_gamma ** (epoch // config.step_epochs)
        return config.step_gamma ** sum(epoch >= e for e in config.step_epochs)
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@contextmanager
def stop_on_signals() -> Iterator[dict[str, bool]]:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second SIGINT aborts."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        print(
            f"\n{signal.Signals(signum).name}: saving a resumable checkpoint at the next step "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def build_splits(config: TrainConfig, data_path: str | None = None) -> DataSplits:
    """The config's data (its data_path unless `data_path` is given)."""
    return build_datasets(
        config.dataset, config.data_dir, config.augment, config.image_size,
        config.train_subset, config.test_subset, config.strict_data, config.seed,
        data_path or config.data_path, config.resident_limit_mb,
    )  # fmt: skip


def build_model(config: TrainConfig, splits: DataSplits) -> nn.Module:
    return model_for(config, splits.num_classes, splits.in_chans, splits.image_size)


def model_for(config: TrainConfig, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    model_kwargs = dict(config.model_kwargs)
    if is_external(config.model):  # torchvision:NAME / timm:NAME, attention attached
        return create_external(
            config.model, num_classes, in_chans, config.pretrained,
            config.attach, config.attach_placement,
            attention_kwargs=config.attention_kwargs, **model_kwargs,
        )  # fmt: skip
    if image_size <= 64:
        model_kwargs.setdefault("small_input", True)
    return create_model(
        config.model,
        attention=config.attention,
        num_classes=num_classes,
        in_chans=in_chans,
        attention_kwargs=config.attention_kwargs,
        **model_kwargs,
    )


def check_builds(config: TrainConfig) -> None:
    """Build the config's model on the meta device (no memory, no data, no weights file read):
    a bad model or attention argument fails here, before a grid's first run trains."""
    with torch.device("meta"):
        model_for(replace(config, pretrained=None), 10, 3, config.image_size or 32)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.scaled_lr, momentum=config.momentum,
            nesterov=config.nesterov, weight_decay=config.weight_decay,
        )  # fmt: skip
    return torch.optim.AdamW(
        model.parameters(), lr=config.scaled_lr, weight_decay=config.weight_decay
    )


def _unfinished_leftovers(run_dir: Path) -> None:
    """Remove what a run killed before its first checkpoint left, so it can start afresh."""
    for name in ("config.yaml", "metrics.csv"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def check_same_config(given: dict[str, Any], kept: dict[str, Any], run_dir: Path) -> None:
    """The config a command gives must be the one saved in `run_dir` (for the keys given)."""
    changed = sorted(k for k in given if kept.get(k) != given[k])
    if changed:
        details = ", ".join(f"{k}: {kept.get(k)!r} there, {given[k]!r} now" for k in changed)
        raise ValueError(
            f"{run_dir} holds a run of another config ({details}); give the same options "
            f"as the run that made it, or choose another --output"
        )


def prepare_run(
    config: RunConfig,
    resume: str | Path | None,
    overrides: dict[str, Any] | None,
    load: Callable[[Path, dict[str, Any]], RunConfig] = load_config,  # type: ignore[assignment]
) -> tuple[RunConfig, Path, ckpt.Resumable | None]:
    """The run folder, its config and the checkpoint to resume from: a fresh folder, a saved
    run to continue (`resume` = its folder; its config.yaml read back with `load`), or with
    `resume="auto"` whichever `config.output` calls for."""
    if resume == AUTO:
        run_dir = Path(config.output)
        found = ckpt.newest_complete(run_dir, fall_back=True)
        if found is None:
            if ckpt.has_checkpoint(run_dir):
                raise ValueError(
                    f"every checkpoint in {run_dir} is damaged (see the warnings above); "
                    f"remove {run_dir / ckpt.CHECKPOINTS} to start the run afresh"
                )
            _unfinished_leftovers(run_dir)
            return config, run_dir, None
        resumable = {k: getattr(config, k) for k in RESUMABLE_OVERRIDES if hasattr(config, k)}
        saved = load(run_dir / "config.yaml", resumable)
        fixed = RESUMABLE_OVERRIDES | {"output"}  # all a restarted command may change
        given = {k: v for k, v in config.to_dict().items() if k not in fixed}
        check_same_config(given, saved.to_dict(), run_dir)
    elif resume is None:
        run_dir = Path(config.output)
        if ckpt.has_checkpoint(run_dir) or (run_dir / "config.yaml").exists():
            raise ValueError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                f"(or --resume auto) or choose another --output"
            )
        return config, run_dir, None
    else:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file() or not ckpt.has_checkpoint(run_dir):
            raise ValueError(
                f"nothing to resume in {run_dir}: it needs config.yaml and a checkpoint "
                f"(written at the end of each epoch, every --checkpoint-every steps or "
                f"--checkpoint-minutes, and on Ctrl-C)"
            )
        extra = set(overrides or {}) - RESUMABLE_OVERRIDES
        if extra:
            raise ValueError(
                f"a resumed run keeps its saved config; only {sorted(RESUMABLE_OVERRIDES)} may "
                f"change, not {sorted(extra)}"
            )
        saved = load(run_dir / "config.yaml", dict(overrides or {}))
        found = ckpt.newest_complete(run_dir, fall_back=False)
        assert found is not None  # has_checkpoint, and a damaged one raised
    state = found.state
    if state["epoch"] >= saved.epochs and state["batch_in_epoch"] == 0:
        raise RunFinished(
            f"the run in {run_dir} already finished all {saved.epochs} epochs; to train "
            f"longer, resume with --epochs N (N > {saved.epochs}) or start a new run"
        )
    return saved, run_dir, found


def train(
    config: TrainConfig,
    resume: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `config` (or resume the run in `resume`, with execution-only `overrides`).

    `on_step(global_step, model)` runs after every optimizer step (tests use it to interrupt
    a run or to break the model).
    """
    dist_info, device = setup(config.device, config.dist_timeout_minutes)
    try:
        config, run_dir, found = prepare_run(config, resume, overrides)
        with peers_lost_message(dist_info, run_dir):
            return _train(config, run_dir, found, dist_info, device, on_step)
    finally:
        teardown()


def _train(
    config: TrainConfig,
    run_dir: Path,
    found: ckpt.Resumable | None,
    dist_info: Dist,
    device: torch.device,
    on_step: Callable[[int, nn.Module], None] | None,
) -> TrainResult:
    state = found.state if found is not None else None
    main = dist_info.is_main
    log = print if main else (lambda *a, **k: None)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(config.flush_denormal)  # process-wide; a no-op where unsupported
    dtype = amp_dtype(config.amp, device)

    # ---- data ---------------------------------------------------------------------------
    splits = build_splits(config).to(device, config.channels_last)
    world = dist_info.world_size
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide by {world} processes")
    per_rank_batch = config.batch_size // world
    sampler = DistributedSampler(
        splits.train, num_replicas=world, rank=dist_info.rank, shuffle=True, seed=config.seed
    )
    batches_per_epoch = len(sampler) // per_rank_batch  # drop_last: every step is full
    steps_per_epoch = batches_per_epoch // config.accumulate
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(splits.train)} training images make no full step of batch "
            f"{config.batch_size} x accumulate {config.accumulate}; lower the batch size"
        )
    test_loader = split_batches(
        splits.test, range(dist_info.rank, len(splits.test), world), per_rank_batch,
        workers=config.workers, report_unreadable=main, pin_memory=device.type == "cuda",
    )  # fmt: skip

    # ---- model, optimizer, schedule -----------------------------------------------------
    torch.manual_seed(config.seed)
    model = build_model(config, splits).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and dist_info.enabled:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices (SyncBatchNorm has no CPU version)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = count_parameters(model)
    optimizer = build_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, config)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.ema_decay
        else None
    )
    start_epoch, start_batch, step, best = 0, 0, 0, math.inf
    if found is not None and state is not None:
        load_checkpoint(model, found.weights, source="cbam")
        ckpt.restore_loop_state(state, optimizer, scheduler, scaler)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_batch = state["epoch"], state["batch_in_epoch"]
        step, best = state["step"], state["best_top1_err"]
    net: nn.Module = model
    if dist_info.enabled:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        net = torch.compile(net)

    # ---- logging ------------------------------------------------------------------------
    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if state is not None:
            keep_metrics_up_to(run_dir / "metrics.csv", state)
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step if state else None)
        log(
            f"{config.model} + {config.attention or 'no attention'}: {params / 1e6:.3f}M params | "
            f"{config.dataset}: {len(splits.train)} train / {len(splits.test)} test images, "
            f"{splits.image_size_note or f'{splits.image_size} px'}, {splits.data_path} data "
            f"path | "
            f"{steps_per_epoch} steps/epoch x {config.epochs} epochs | batch {config.batch_size} "
            f"on {world} x {device.type} | lr {config.scaled_lr:g} | run folder {run_dir}"
            + (f" | resuming at epoch {start_epoch + 1}, step {step}" if state else "")
        )

    def sync_buffers() -> None:
        """Collective: every rank calls it before evaluating or saving."""
        for module in (model, ema):
            if module is not None:
                average_buffers(module, dist_info)

    def save_checkpoint(
        epoch: int,
        batch_in_epoch: int,
        epoch_totals: torch.Tensor | None = None,
        epoch_seconds: float = 0.0,
    ) -> None:
        sync_buffers()
        if not main:
            return
        ckpt.save_checkpoint(
            run_dir,
            model,
            {
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "best_top1_err": best,
                "ema": ema.state_dict() if ema is not None else None,
                "epoch_totals": (
                    epoch_totals.cpu() if epoch_totals is not None else torch.zeros(4)
                ),
                "epoch_seconds": epoch_seconds,
                **ckpt.loop_state(optimizer, scheduler, scaler),
            },
        )

    periodic = PeriodicCheckpoint(config.checkpoint_every, config.checkpoint_minutes)

    # ---- the loop -----------------------------------------------------------------------
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    last: EvalMetrics | None = None
    epoch = start_epoch
    with stop_on_signals() as signals:
        for epoch in range(start_epoch, config.epochs):
            splits.train.set_epoch(epoch)
            skip = start_batch if epoch == start_epoch else 0
            net.train()
            # totals: loss sum, correct, seen, skipped
            bar, totals, t0 = start_epoch_pass(
                EpochPass(splits.train, sampler, per_rank_batch, config.workers, collate_skipping),
                epoch, config.epochs, skip, batches_per_epoch, 4, state, main, device,
            )  # fmt: skip
            for batch_in_epoch, (images, labels, n_skipped) in enumerate(bar, start=skip + 1):
                totals[3] += n_skipped
                if labels.numel() == 0:
                    continue
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                if config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = net(images)
                    loss = criterion(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; stopped "
                        f"without saving, so {run_dir / 'last.safetensors'} is still the last "
                        f"good checkpoint. Try a lower --lr, a warm-up (warmup_epochs), or "
                        f"--amp off"
                    )
                scaler.scale(loss / config.accumulate).backward()
                totals[0] += loss.detach() * labels.numel()
                totals[1] += (logits.argmax(1) == labels).sum()
                totals[2] += labels.numel()
                if batch_in_epoch % config.accumulate:
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                if main and step % config.log_every == 0:
                    rate = totals[2].item() * world / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                    writer.add_scalar("train/loss", loss.item(), step)  # type: ignore[union-attr]
                if on_step is not None:
                    on_step(step, model)
                # the epoch's last step needs no periodic save: the epoch-end one follows
                due = batch_in_epoch < batches_per_epoch and periodic.due(step)
                stop, due = any_rank((signals["stop"], due), dist_info, device)
                if stop or due:  # the running sums over all ranks carry over a resume
                    seconds = time.perf_counter() - t0
                    partial = all_reduce_sum(totals.clone(), dist_info)
                    save_checkpoint(epoch, batch_in_epoch, partial, seconds)
                    periodic.saved()
                if stop:
                    log(
                        f"stopped at epoch {epoch + 1}, step {step}; resume with --resume {run_dir}"
                    )
                    return TrainResult(run_dir, epoch, True, best, last, model)
            bar.close()
            seconds = time.perf_counter() - t0
            sync_buffers()
            eval_model = ema.module if ema is not None else model
            last = evaluate(
                eval_model, test_loader, splits.num_classes, device, dtype,
                config.channels_last, dist_info,
            )  # fmt: skip
            if dist_info.enabled:
                torch.distributed.all_reduce(totals)
            train_loss, train_err = (
                (totals[0] / totals[2]).item(),
                100 * (1 - totals[1] / totals[2]).item(),
            )
            improved = last.top1_err < best
            best = min(best, last.top1_err)
            start_batch = 0
            row = {
                "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                "train_loss": train_loss, "train_top1_err": train_err,
                "test_loss": last.loss, "test_top1_err": last.top1_err,
                "test_top5_err": last.top5_err,
                "train_images_per_s": totals[2].item() / seconds, "epoch_seconds": seconds,
                "skipped_images": int(totals[3].item()) + last.skipped,
                "params": params,
            }  # fmt: skip
            if main:  # before the checkpoint: a resume from an older one drops the row again
                if improved:
                    ckpt.save_weights(eval_model, run_dir / "best.safetensors", {"step": str(step)})
                append_metrics(run_dir / "metrics.csv", row)
            save_checkpoint(epoch + 1, 0)
            periodic.saved()
            if main:
                for key in (
                    "train_loss",
                    "train_top1_err",
                    "test_loss",
                    "test_top1_err",
                    "test_top5_err",
                ):
                    writer.add_scalar(key.replace("_", "/", 1), row[key], step)  # type: ignore[union-attr]
                writer.flush()  # type: ignore[union-attr]
                note = (
                    f" | skipped {row['skipped_images']} unreadable images"
                    if row["skipped_images"]
                    else ""
                )
                log(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f} err "
                    f"{train_err:.2f}% | test loss {last.loss:.4f} top-1 err {last.top1_err:.2f}% "
                    f"top-5 err {last.top5_err:.2f}% | {row['train_images_per_s']:.0f} img/s, "
                    f"{seconds:.0f}s{note}"
                )
    if writer is not None:
        writer.close()
    return TrainResult(run_dir, config.epochs, False, best, last, model)


@dataclass(frozen=True)
class EpochPass:
    """What an epoch's batches are drawn from."""

    dataset: Any
    sampler: DistributedSampler[Any]
    batch_size: int  # per rank
    workers: int
    collate_fn: Callable[..., Any]
    generator: torch.Generator | None = None


def start_epoch_pass(
    source: EpochPass, epoch: int, epochs: int, skip: int, batches: int, n_totals: int,
    state: dict[str, Any] | None, main: bool, device: torch.device,
) -> tuple[Any, torch.Tensor, float]:  # fmt: skip
    """The epoch's progress bar over its batches from `skip` on, the running sums and the start
    time. Resuming mid-epoch (skip > 0) takes the sampler's order for the epoch past the
    batches already seen, and carries over the sums and seconds saved in `state`, so a resumed
    run sees exactly the batches, and logs exactly the figures, of one never stopped."""
    source.sampler.set_epoch(epoch)
    loader = split_batches(
        source.dataset, list(source.sampler)[skip * source.batch_size :], source.batch_size,
        drop_last=True, workers=source.workers, report_unreadable=main and not skip,
        pin_memory=device.type == "cuda", collate_fn=source.collate_fn,
        generator=source.generator,
    )  # fmt: skip
    totals = torch.zeros(n_totals, dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    if skip and state is not None:
        if main:  # saved already summed over ranks
            totals += state["epoch_totals"].to(device)
        t0 -= state["epoch_seconds"]
    bar = tqdm(
        loader, total=batches - skip, desc=f"epoch {epoch + 1}/{epochs}",
        disable=not (main and sys.stderr.isatty()), leave=False, dynamic_ncols=True,
    )  # fmt: skip
    return bar, totals, t0


class PeriodicCheckpoint:
    """When a checkpoint is due inside an epoch: every `every` steps and/or every `minutes`
    of wall time since the last one (None: never), so a killed job loses at most that."""

    def __init__(self, every: int | None, minutes: float | None) -> None:
        self.every, self.seconds = every, None if minutes is None else 60 * minutes
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.every is not None and step % self.every == 0
        by_time = self.seconds is not None and time.monotonic() - self.last >= self.seconds
        return by_steps or by_time

    def saved(self) -> None:
        self.last = time.monotonic()


def keep_metrics_up_to(path: Path, state: dict[str, Any]) -> None:
    """Drop metrics.csv's rows of epochs past `state`'s: they were logged by a run killed
    before its epoch-end checkpoint was complete, and the resumed run logs them again."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= state["epoch"]]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def append_metrics(
    path: Path, row: dict[str, Any], columns: tuple[str, ...] = METRIC_COLUMNS
) -> None:
    """Add one row to a metrics.csv, writing the header first when the file is new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)
