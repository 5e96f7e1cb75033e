"""The CUDA path in one prepared check: `make gpu-check`, on one GPU, in about 8 minutes.

A GPU is lent to this project rarely and briefly, so everything the CUDA path needs proven
runs in one command that writes every figure to one JSON and one markdown report:

    PYTHONPATH=src python3 scripts/gpu_check.py --output runs/gpu-check
    PYTHONPATH=src python3 scripts/gpu_check.py --output /tmp/dry --dry-run   # CPU, tiny sizes

Each part runs in its own process (one process tree) under its own time budget (`PARTS`); a
part that runs over is killed and reported, the others still run. A part whose packages are
missing is skipped with a line in the report; every failure is reported with its traceback,
and the command exits 1 if any check failed. `--dry-run` runs the same code on CPU with tiny
sizes (Triton in its interpreter, torch.compile with Dynamo's eager backend) so that the check
cannot rot between GPU loans; the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import json
import math
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_NAME = "gpu_check"
GRACE_S = 15  # past its budget, a part is killed
LOG_TAIL = 4000


@dataclass(frozen=True)
class Settings:
    dry_run: bool
    work: Path  # scratch folder shared by the parts

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


@dataclass
class Record:
    """What one part found, saved after every step: a part killed at its budget keeps what it
    finished."""

    name: str
    path: Path
    deadline: float
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def save(self) -> None:
        data = {"figures": self.figures, "failures": self.failures, "skipped": self.skipped}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.path)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def fail(self, check: str, error: BaseException) -> None:
        self.failures.append(
            {
                "check": check,
                "error": f"{type(error).__name__}: {error}",
                "traceback": "".join(traceback.format_exception(error)),
            }
        )

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        """Run one check: an exception is a failure of that check, and the part goes on."""
        try:
            yield
        except Exception as error:
            self.fail(name, error)
        finally:
            self.save()


# --------------------------------------------------------------------------- shared helpers


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _device(settings: Settings) -> Any:
    import torch

    return torch.device(settings.device)


def _eager_compile() -> None:
    """Dry-run only: torch.compile with Dynamo's eager backend. Inductor takes minutes on two
    CPU cores; Dynamo's capture (graph breaks, guards, the fused ops' fake kernels) is what
    the dry-run can check, and the GPU run compiles with Inductor."""
    import torch

    torch.compile = functools.partial(torch.compile, backend="eager")  # type: ignore[assignment]


def write_fashion_mnist(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """Random images in Fashion-MNIST's idx files, in torchvision's layout under `root`: data
    for `cbam train` on a machine that has none (the GPU machine reaches no network)."""
    import torch

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (count,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 256, (count, 28, 28), generator=g, dtype=torch.uint8)
        images = (images // 4 + labels.view(-1, 1, 1) * 19).to(torch.uint8)  # learnable
        header = struct.pack(">IIII", 0x803, count, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        header = struct.pack(">II", 0x801, count)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(header + labels.numpy().tobytes())
    return root


def train_batch(settings: Settings) -> int:
    """`cbam train`'s batch: the small recipe's 128 (2 steps of 8 in the dry-run)."""
    return 8 if settings.dry_run else 128


def train_arguments(
    settings: Settings, data: Path, output: Path, images: int, epochs: int, compiled: bool
) -> list[str]:
    """`cbam train` on the synthetic data: AMP bf16, channels_last, small recipe."""
    batch = train_batch(settings)
    args = [
        "train",
        "--data-dir",
        str(data),
        "--dataset",
        "fashion-mnist",
        "--output",
        str(output),
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch),
        "--train-subset",
        str(images),
        "--test-subset",
        str(batch * 2),
        "--device",
        settings.device,
        "--amp",
        "bf16",
        "--channels-last",
        "--workers",
        "0" if settings.dry_run else "8",
    ]
    return [*args, "--compile"] if compiled else args


def training_figures(run_dir: Path, images: int, epochs: int, batch: int) -> dict[str, Any]:
    """Steps and each epoch's img/s, seconds and test error, from the run's metrics.csv."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keep = ("epoch", "train_images_per_s", "epoch_seconds", "test_top1_err", "train_loss")
    return {
        "steps": math.ceil(images / batch) * epochs,
        "epochs": [{k: row[k] for k in keep if k in row} for row in rows],
    }


# --------------------------------------------------------------------------- part: correctness


def part_correctness(record: Record, settings: Settings) -> None:
    """The fused path on the device against the reference layer: outputs, gradients and
    running statistics, fp32/bf16/fp16, both layouts, odd sizes, every claimed variant, module
    and block, train/eval/inference; that the Triton kernels ran exactly where they apply;
    deterministic mode; no host sync; torch.compile against eager."""
    import torch

    from cbam.bench import kernel_checks as kc
    from cbam.kernels import triton_cbam

    device = _device(settings)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        record.figures["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
        }
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    triton_on = triton_cbam.available() and (device.type == "cuda" or interpreting)
    if triton_on:
        triton_cbam.set_enabled(True)
    else:
        reason = "triton is not installed" if not triton_cbam.available() else "no interpreter"
        record.skipped.append(f"Triton kernels: {reason}; the fused ATen path is checked")
    few = [{}, {"pool_types": ("max",)}, {"order": "parallel"}, {"spatial": "conv1x1"}]
    fp32, halves = [torch.float32], [torch.bfloat16, torch.float16]
    # Odd sizes: 7x7, 14x14, 1x1 maps, batch 1. A 1x1 map in training has batch 16: with
    # fewer samples the spatial BatchNorm's batch statistics cancel its conv's gradient to
    # rounding noise (exactly, for 2), which no tolerance can compare.
    if settings.dry_run:  # every variant once, odd sizes and dtypes on the default one
        one = [(2, 16, 5, 7)]
        plan = [
            {"kinds": ["module"], "variants": kc.fused_variants(), "shapes": one,
             "dtypes": fp32, "modes": ["train"]},
            {"kinds": ["module"], "variants": few[:1], "shapes": [(16, 16, 1, 1), (1, 16, 4, 4)],
             "dtypes": fp32},
            {"kinds": ["block"], "variants": few[:3:2], "shapes": one, "dtypes": fp32,
             "formats": ["nchw"], "modes": ["train", "inference"]},
            {"kinds": ["module"], "variants": few[:1], "shapes": one, "dtypes": halves,
             "formats": ["nchw"], "modes": ["train"]},
        ]  # fmt: skip
    else:
        shapes = [(2, 64, 14, 14), (4, 32, 7, 7), (16, 32, 1, 1), (1, 64, 14, 14),
                  (2, 64, 56, 56)]  # fmt: skip
        plan = [
            {"kinds": ["module"], "variants": kc.fused_variants(), "shapes": shapes,
             "dtypes": fp32},
            {"kinds": ["block"], "variants": few[:3], "shapes": shapes, "dtypes": fp32 + halves},
            {"kinds": ["module"], "variants": [*few, {"spatial": None}], "shapes": shapes,
             "dtypes": halves},
        ]  # fmt: skip
    # the single checks first: the case matrix then takes what is left of the budget
    with record.check("deterministic"):
        record.figures["deterministic"] = kc.check_deterministic(device)
    with record.check("host syncs"):
        record.figures["host_syncs"] = _host_syncs(device)
    with record.check("compiled"):
        record.figures["compiled_max_error"] = kc.check_compiled(device)
    todo = [case for cases in plan for case in kc.cases(**cases)]
    summary: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    record.figures.update(cases=summary, failed_cases=failed)
    with kc.counting(triton_cbam, "gate") as calls:
        for i, case in enumerate(todo):
            if record.time_left() < 5:
                record.failures.append(
                    {
                        "check": "cases",
                        "error": f"the budget ran out with "
                        f"{len(todo) - i} of {len(todo)} cases to go",
                        "traceback": "",
                    }
                )
                break
            before = len(calls)
            key = f"{case.kind} {str(case.dtype).removeprefix('torch.')}"
            group = summary.setdefault(key, {"cases": 0, "triton": 0, "worst": None})
            group["cases"] += 1
            try:
                worst = kc.compare_case(case, device)
                ran = len(calls) > before
                expected = triton_on and kc.paper_variant(case.variant) and case.nchw_contiguous
                if ran != expected:
                    raise AssertionError(
                        f"{case.name}: the Triton kernels {'ran' if ran else 'did not run'}"
                    )
            except Exception as error:
                failed.append({"case": case.name, "error": f"{type(error).__name__}: {error}"})
                if not isinstance(error, AssertionError) and len(record.failures) < 5:
                    record.fail(case.name, error)  # a crash: keep its traceback
                continue
            group["triton"] += ran
            if group["worst"] is None or worst["ratio"] > group["worst"]["ratio"]:
                group["worst"] = {**worst, "case": case.name}
            if i % 50 == 0:
                record.save()
    if failed:
        record.failures.append(
            {
                "check": "cases",
                "error": f"{len(failed)} case(s) out of "
                "tolerance or on the wrong path: " + failed[0]["error"],
                "traceback": "",
            }
        )


def _host_syncs(device: Any) -> dict[str, list[str]]:
    """Host syncs in the fused path's training step and inference, with the kernels the
    device runs and with the ATen path: none is allowed. On CPU the ATen path alone (what CUDA
    runs with Triton off; the interpreter itself copies to the host)."""
    import torch

    from cbam import kernels
    from cbam.bench.kernel_checks import host_syncs, sync_free_modules

    contexts = {"aten": kernels.disabled}
    if device.type == "cuda":
        contexts["kernels"] = contextlib.nullcontext
    found = {}
    for path, context in contexts.items():
        for name, step in sync_free_modules(device).items():
            with context():
                syncs = host_syncs(step)
                if device.type == "cuda":  # and what CUDA itself calls a sync
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        step()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
            found[f"{name} ({path})"] = syncs
    bad = {k: v for k, v in found.items() if v}
    if bad:
        raise AssertionError(f"host syncs in the fused path: {bad}")
    return found


# --------------------------------------------------------------------------- part: cpu-kernels


def part_cpu_kernels(record: Record, settings: Settings) -> None:
    """The C++ extension built with this machine's compiler and torch, then the fused layer
    and block that run it against the reference on CPU."""
    import torch

    from cbam.bench import kernel_checks as kc
    from cbam.kernels import native_cbam

    start = time.perf_counter()
    with record.check("build"):
        if native_cbam.load() is None:
            raise RuntimeError("the CPU kernels did not build (see the log)")
    record.figures["build_seconds"] = round(time.perf_counter() - start, 1)
    worst: dict[str, Any] = {"ratio": -1.0}
    shapes = [(2, 32, 7, 7), (16, 32, 1, 1)]
    with record.check("cases"), kc.counting(native_cbam, "kernels") as calls:
        for case in kc.cases(("module", "block"), [{}], shapes, [torch.float32]):
            before = len(calls)
            result = kc.compare_case(case, torch.device("cpu"))
            if len(calls) == before:
                raise AssertionError(f"{case.name}: the CPU kernels did not run")
            if result["ratio"] > worst["ratio"]:
                worst = {**result, "case": case.name}
    record.figures["worst"] = worst


# --------------------------------------------------------------------------- part: bench


def bench_runs(settings: Settings, compiled: bool) -> list[tuple[str, Any]]:
    """The `cbam bench` runs of a part, most important first: AMP bf16 channels_last (what
    mixed-precision users run; the fused CBAM runs its reference path under autocast), bf16
    weights in NCHW (where the fused path and its Triton kernels run), the module alone at
    each stage's size."""
    from cbam.bench.overhead import BenchConfig

    sizes: dict[str, Any] = {
        "model": "resnet50",
        "batch_size": 64,
        "image_size": 224,
        "repeats": 10,
        "warmup": 3,
    }
    if settings.dry_run:
        sizes = {"model": "resnet20", "batch_size": 2, "image_size": 8, "repeats": 1,
                 "warmup": 1}  # fmt: skip
    # On CPU peak memory comes from the profiler (~2 s a call here), on CUDA from the
    # allocator's statistics: the dry-run leaves out a path the GPU run does not take.
    common = {
        **sizes,
        "device": settings.device,
        "parts": ("model",),
        "memory": not settings.dry_run,
    }
    everyone = ("plain", "se", "cbam-reference", "cbam-fused", "timm-cbam")
    if compiled:
        cl = {**common, "modes": ("compiled",), "memory_formats": ("channels_last",)}
        return [
            (
                "compiled, AMP bf16, channels_last",
                BenchConfig(**cl, amp="bf16", variants=("plain", "cbam-fused")),
            ),
            (
                "compiled, bf16 weights, channels_last",
                BenchConfig(**cl, dtype="bfloat16", variants=("plain", "cbam-fused")),
            ),
            (
                "compiled, AMP bf16, channels_last: SE and timm",
                BenchConfig(**cl, amp="bf16", variants=("plain", "se", "timm-cbam")),
            ),
        ]
    # bf16 convolutions on CPU take seconds to set up per shape: the dry-run keeps float32
    weights = "float32" if settings.dry_run else "bfloat16"
    kernels_off = ("plain", "cbam-reference", "cbam-fused", "cbam-fused-aten", "timm-cbam")
    modules = ("se", "cbam-reference", "cbam-fused", "cbam-fused-aten", "timm-cbam")
    return [
        (
            "eager, AMP bf16, channels_last",
            BenchConfig(**common, amp="bf16", memory_formats=("channels_last",), variants=everyone),
        ),
        (
            "eager, AMP fp16, NCHW and channels_last",
            BenchConfig(
                **common,
                amp="fp16",
                memory_formats=("nchw", "channels_last"),
                variants=("plain", "cbam-reference", "cbam-fused"),
            ),
        ),
        (
            f"eager, {weights} weights, NCHW",
            BenchConfig(**common, dtype=weights, variants=kernels_off),
        ),
        (
            f"module alone, eager, {weights}",
            BenchConfig(
                **{**common, "parts": ("module",)},
                dtype=weights,
                memory_formats=("nchw", "channels_last"),
                variants=modules,
            ),
        ),
    ]


def bench_summary(result: Any) -> dict[str, Any]:
    """img/s, ratio to plain and peak memory per variant (model runs), or per stage size the
    module's time and speed-up over timm's (module runs)."""
    batch = result.config.batch_size
    models: dict[str, dict[str, Any]] = {}
    modules = []
    for row in result.rows:
        ratio = row.ratio.median if row.ratio else None
        peak = None if row.peak_bytes is None else round(row.peak_bytes / 2**20, 1)
        if row.part == "module":
            speedup = round(1 / ratio, 3) if ratio else None
            modules.append(
                {
                    "size": row.size,
                    "format": row.memory_format,
                    "variant": row.variant,
                    "ms": round(row.time.median * 1e3, 3),
                    "speedup_over_" + row.baseline: speedup,
                    "peak_mb": peak,
                }
            )
            continue
        entry = models.setdefault(row.variant, {"variant": row.variant})
        entry[f"{row.part}_img_s"] = round(batch / row.time.median, 1)
        entry[f"{row.part}_x_plain"] = None if ratio is None else round(ratio, 3)
        entry[f"{row.part}_peak_mb"] = peak
        if row.compile_seconds is not None:
            entry[f"{row.part}_first_call_s"] = round(row.compile_seconds, 1)
    plain = models.get("plain", {}).get("train_peak_mb")
    for entry in models.values():
        peak = entry.get("train_peak_mb")
        entry["train_peak_x_plain"] = round(peak / plain, 3) if peak and plain else None
    return {"models": list(models.values()), "modules": modules}


def bench_targets(name: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's GPU targets, measured in one run's summary."""
    targets = []
    fused = next((m for m in summary["models"] if m["variant"] == "cbam-fused"), None)
    if fused is not None:
        for key, limit, what in (
            ("train_x_plain", 1.10, "training"),
            ("inference_x_plain", 1.05, "inference"),
            ("train_peak_x_plain", 1.05, "peak training memory"),
        ):
            if fused.get(key) is not None:
                targets.append(
                    {
                        "target": f"fused CBAM {what} <= {limit}x plain",
                        "run": name,
                        "measured": fused[key],
                        "met": fused[key] <= limit,
                    }
                )
    stage1 = [m for m in summary["modules"] if m["variant"] == "cbam-fused"]
    if stage1 and stage1[0].get("speedup_over_timm-cbam") is not None:
        first = stage1[0]  # the first stage's size, NCHW: where the Triton kernels run
        targets.append(
            {
                "target": "fused module >= 2x faster than timm's at stage 1",
                "run": f"{name} ({first['size']}, {first['format']})",
                "measured": first["speedup_over_timm-cbam"],
                "met": first["speedup_over_timm-cbam"] >= 2,
            }
        )
    return targets


def _bench(record: Record, settings: Settings, compiled: bool) -> None:
    import torch

    from cbam.bench.overhead import format_report, run_overhead
    from cbam.kernels import triton_cbam

    if settings.device == "cuda" and triton_cbam.available():
        triton_cbam.set_enabled(True)  # cbam-fused runs them; cbam-fused-aten turns them off
    runs = record.figures.setdefault("runs", [])
    last = None
    planned = bench_runs(settings, compiled)
    if settings.dry_run and compiled:  # Dynamo's capture is the same for each; one is enough
        record.skipped += [
            f"{name}: dry run, only the first compiled run" for name, _ in planned[1:]
        ]
        planned = planned[:1]
    for name, config in planned:
        if last is not None and record.time_left() < 1.2 * last:
            record.skipped.append(
                f"{name}: {record.time_left():.0f} s of the budget left, the "
                f"last run took {last:.0f} s"
            )
            continue
        start = time.perf_counter()
        with record.check(name):
            torch._dynamo.reset()
            result = run_overhead(config)
            summary = bench_summary(result)
            runs.append(
                {
                    "name": name,
                    "summary": summary,
                    "report": format_report(result),
                    "targets": bench_targets(name, summary),
                    "result": result.to_dict(),
                }
            )
            record.skipped += [f"{name}: {s}" for s in result.skipped]
        last = time.perf_counter() - start
    if not compiled and record.time_left() > 20:
        with record.check("profile"):
            record.figures["profile"] = profile_fused_step(settings)


def profile_fused_step(settings: Settings) -> str:
    """torch.profiler's top ops in three training steps of fused CBAM-ResNet (half-precision
    weights, NCHW, Triton on where it runs): where the time goes, for a target the run misses."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cbam.bench.overhead import DTYPES, build_model, train_step

    name, config = bench_runs(settings, compiled=False)[1]
    device = _device(settings)
    dtype = DTYPES[config.dtype]
    model = build_model("cbam-fused", config.model).to(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    size = config.image_size
    images = torch.randn(config.batch_size, 3, size, size, device=device, dtype=dtype)
    labels = torch.randint(0, 1000, (config.batch_size,), device=device)

    def step() -> None:
        train_step(model, model, optimizer, images, labels, config, "cbam-fused")

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{name}, cbam-fused, 3 training steps\n" + prof.key_averages().table(
        sort_by=key, row_limit=20
    )


def part_bench_eager(record: Record, settings: Settings) -> None:
    """`cbam bench`, eager: ResNet-50, batch 64 at 224 px: plain, SE, reference and fused CBAM
    (Triton on; and off: cbam-fused-aten), timm's CbamModule; training and inference img/s,
    ratios to plain, peak CUDA memory; the module alone at each stage; a profile."""
    _bench(record, settings, compiled=False)


def part_bench_compiled(record: Record, settings: Settings) -> None:
    """`cbam bench`, torch.compile (Inductor): plain and fused CBAM under AMP bf16 and in bf16
    weights, then SE and timm's module, as far as the budget goes."""
    _bench(record, settings, compiled=True)


# --------------------------------------------------------------------------- part: train


def part_train(record: Record, settings: Settings) -> None:
    """`cbam train` on the device: AMP bf16, channels_last, --compile, 2 epochs of synthetic
    Fashion-MNIST (300 steps on the GPU); the second epoch's img/s is past compilation."""
    from cbam.cli import main as cli

    images, epochs = (16, 2) if settings.dry_run else (19200, 2)
    data = write_fashion_mnist(settings.work / "data-train", images, 512)
    run_dir = settings.work / "run-train"
    with record.check("cbam train"):
        code = cli(train_arguments(settings, data, run_dir, images, epochs, compiled=True))
        if code != 0:
            raise RuntimeError(f"cbam train exited with {code}")
        batch = train_batch(settings)
        record.figures.update(training_figures(run_dir, images, epochs, batch))
        record.figures["note"] = "AMP: the CBAM layers run their reference path under autocast"


# --------------------------------------------------------------------------- part: torchrun


def part_torchrun(record: Record, settings: Settings) -> None:
    """A 1-GPU torchrun launch: an NCCL process group (all-reduce, DDP with SyncBatchNorm over
    a CBAM-ResNet-18, AMP bf16), then `cbam train` under the same launcher."""
    write_fashion_mnist(
        settings.work / "data-torchrun", *((16, 16) if settings.dry_run else (19200, 512))
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "cbam.bench.gpu_check",
        "--worker",
        "torchrun",
        "--work",
        str(settings.work),
    ]
    if settings.dry_run:
        command.append("--dry-run")
    result_path = settings.work / "torchrun-worker.json"
    with record.check("torchrun"):
        run = subprocess.run(
            command, timeout=max(record.time_left() - 5, 10), capture_output=True, text=True
        )
        print(run.stdout[-LOG_TAIL:], run.stderr[-LOG_TAIL:], sep="\n")
        if run.returncode != 0:
            raise RuntimeError(f"torchrun exited with {run.returncode}: {run.stderr[-1500:]}")
        record.figures.update(json.loads(result_path.read_text()))


def torchrun_worker(settings: Settings) -> None:
    """Inside torchrun: the process group, DDP steps, then `cbam train`; figures to a file."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from cbam.cli import main as cli
    from cbam.models import create_model

    cuda = settings.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    figures: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    try:
        total = torch.full((1,), float(dist.get_rank() + 1), device=device)
        dist.all_reduce(total)
        world = dist.get_world_size()
        if total.item() != world * (world + 1) / 2:
            raise AssertionError(f"all_reduce gave {total.item()}")
        name = "resnet20" if settings.dry_run else "resnet18"
        model = create_model(name, attention="cbam", num_classes=10)
        if cuda:  # SyncBatchNorm has no CPU kernels
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device, memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        batch, size, steps = (4, 8, 2) if settings.dry_run else (64, 112, 30)
        images = torch.randn(batch, 3, size, size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (batch,), device=device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(ddp(images), labels)
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()

        step()
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step()
        figures["ddp"] = {
            "model": f"{name} + cbam",
            "sync_bn": cuda,
            "batch": batch,
            "image_size": size,
            "steps": steps,
            "img_s": round(batch * steps / (time.perf_counter() - start), 1),
        }
    finally:
        dist.destroy_process_group()
    images, epochs = (16, 1) if settings.dry_run else (19200, 1)
    run_dir = settings.work / "run-torchrun"
    data = settings.work / "data-torchrun"
    code = cli(train_arguments(settings, data, run_dir, images, epochs, compiled=False))
    if code != 0:
        raise RuntimeError(f"cbam train under torchrun exited with {code}")
    batch = train_batch(settings)
    figures["train"] = training_figures(run_dir, images, epochs, batch)
    figures["note"] = (
        "with one process the trainer runs as a world of one (no process group, "
        "no DDP); the DDP figures above are NCCL's"
    )
    (settings.work / "torchrun-worker.json").write_text(json.dumps(figures, indent=1))


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: int  # on the GPU; the dry-run is far inside it
    run: Callable[[Record, Settings], None]
    requires: tuple[str, ...] = ()  # modules without which the part is skipped
    env: tuple[tuple[str, str], ...] = ()
    beside: str | None = None  # runs at the same time as that part (neither is timed)

    @property
    def what(self) -> str:
        return " ".join((self.run.__doc__ or "").split("\n\n")[0].split())


PARTS = (
    # cuBLAS needs a fixed workspace for deterministic mode
    Part("correctness", 120, part_correctness, env=(("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),)),
    Part("cpu-kernels", 120, part_cpu_kernels, requires=("ninja",), beside="correctness"),
    Part("bench-eager", 75, part_bench_eager),
    Part("bench-compiled", 150, part_bench_compiled),
    Part("train", 70, part_train, requires=("torchvision",)),
    Part("torchrun", 60, part_torchrun, requires=("torchvision",)),
)
BY_NAME = {part.name: part for part in PARTS}


def total_budget_s() -> int:
    return sum(part.budget_s for part in PARTS if part.beside is None)


def run_part(name: str, settings: Settings) -> None:
    """A part's own process: run it, saving its record as it goes."""
    part = BY_NAME[name]
    record = Record(name, settings.work / f"{name}.json", time.monotonic() + part.budget_s)
    record.save()
    if settings.dry_run:
        _eager_compile()
    try:
        part.run(record, settings)
    except Exception as error:
        record.fail(name, error)
    record.save()


# --------------------------------------------------------------------------- the runner


def _child_env(part: Part, settings: Settings) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2])  # so children import this checkout
    env = dict(os.environ, PYTHONUNBUFFERED="1", **dict(part.env))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if settings.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry-run is the CPU run, on any machine
        env["OMP_NUM_THREADS"] = "1"  # one part per core: more threads only spin on each other
        if part.name == "correctness":
            env["TRITON_INTERPRET"] = "1"
    return env


@dataclass
class _Running:
    part: Part
    proc: subprocess.Popen[bytes]
    started: float
    log: Path

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.part.budget_s + GRACE_S


def _start(part: Part, settings: Settings) -> _Running:
    print(f"[{part.name}] started (budget {part.budget_s} s)", flush=True)
    log = settings.work / f"{part.name}.log"
    command = [sys.executable, "-m", "cbam.bench.gpu_check", "--part", part.name,
               "--work", str(settings.work)]  # fmt: skip
    if settings.dry_run:
        command.append("--dry-run")
    with open(log, "wb") as out:  # its own process group, so a kill takes its children too
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env=_child_env(part, settings), preexec_fn=os.setpgrp)  # fmt: skip
    return _Running(part, proc, time.monotonic(), log)


def _result(
    part: Part, status: str, seconds: float, data: dict[str, Any], tail: str = ""
) -> dict[str, Any]:
    return {"name": part.name, "what": part.what, "status": status, "seconds": seconds,
            "budget_s": part.budget_s, "figures": data.get("figures", {}),
            "failures": data.get("failures", []), "skipped": data.get("skipped", []),
            "log_tail": tail}  # fmt: skip


def _collect(run: _Running, settings: Settings, timed_out: bool) -> dict[str, Any]:
    """A finished (or killed) part's record, with what its process said at the end."""
    part, seconds = run.part, round(time.monotonic() - run.started, 1)
    path = settings.work / f"{part.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    tail = run.log.read_text(errors="replace")[-LOG_TAIL:] if run.log.exists() else ""
    failures = data.setdefault("failures", [])
    if timed_out:
        error = f"killed after {seconds} s (budget {part.budget_s} s)"
    elif run.proc.returncode != 0:
        error = f"its process exited with {run.proc.returncode}"
    else:
        error = ""
    if error:
        failures.append({"check": part.name, "error": error, "traceback": tail[-2000:]})
    status = "timed out" if timed_out else "failed" if failures else "passed"
    print(f"[{part.name}] {status} in {seconds} s (budget {part.budget_s} s)", flush=True)
    return _result(part, status, seconds, data, tail)


def _schedule(parts: Sequence[Part], settings: Settings, jobs: int) -> list[dict[str, Any]]:
    """Run `parts` in order, `jobs` at a time; a part `beside` another starts with it and does
    not count. A part past its budget is killed, with its children."""
    pending, running, results = list(parts), [], []
    while pending or running:
        names = {r.part.name for r in running}
        while pending:
            part = pending[0]
            partner_running = part.beside is not None and part.beside in names
            if not partner_running and sum(r.part.beside is None for r in running) >= jobs:
                break
            running.append(_start(pending.pop(0), settings))
            names.add(part.name)
        time.sleep(0.2)
        for run in list(running):
            timed_out = run.proc.poll() is None and run.over_budget()
            if timed_out:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
            if run.proc.returncode is not None:
                running.remove(run)
                results.append(_collect(run, settings, timed_out))
    return results


def run_check(output: Path, dry_run: bool, names: Sequence[str]) -> dict[str, Any]:
    """Every part in `names`, each in its own process under its budget; returns the report
    (also written to `output`). The GPU run takes one part at a time (timings stay clean);
    the dry-run, whose figures mean nothing, one per CPU core."""
    started = time.time()
    results = []
    parts = []
    for part in PARTS:
        missing = [m for m in part.requires if not _importable(m)]
        if part.name not in names:
            continue
        if missing:
            print(f"[{part.name}] skipped: {', '.join(missing)} not installed")
            results.append(_result(part, "skipped", 0, {"skipped": [f"{', '.join(missing)} "
                                                                   "not installed"]}))  # fmt: skip
        else:
            parts.append(part)
    with tempfile.TemporaryDirectory(prefix="cbam-gpu-check-") as work:
        settings = Settings(dry_run, Path(work))
        jobs = max(os.cpu_count() or 1, 1) if dry_run else 1
        results += _schedule(parts, settings, jobs)
    order = [part.name for part in PARTS]
    results.sort(key=lambda r: order.index(r["name"]))
    report = {
        "ok": not any(r["failures"] for r in results),
        "dry_run": dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "budget_s": total_budget_s(),
        "command": " ".join(sys.argv),
        "machine": machine_info(results),
        "parts": results,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=1, default=str))
    (output / f"{REPORT_NAME}.md").write_text(format_markdown(report))
    return report


def _command(*args: str) -> str | None:
    try:
        run = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (run.stdout.strip() or None) if run.returncode == 0 else None


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(results: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Versions and the GPU (nvidia-smi; the correctness part adds torch's view of it)."""
    import torch

    root = Path(__file__).resolve().parents[3]
    info: dict[str, Any] = {
        "gpu": _command(
            "nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": _command("git", "-C", str(root), "rev-parse", "--short", "HEAD"),
    }
    for result in results:
        if "device" in result["figures"]:
            info["device"] = result["figures"]["device"]
    return info


# --------------------------------------------------------------------------- markdown


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows
    ]
    return lines


def _part_lines(part: dict[str, Any]) -> list[str]:
    figures = part["figures"]
    lines = [
        f"\n## {part['name']}: {part['status']} ({part['seconds']} s of {part['budget_s']} s)",
        "",
        part["what"],
        "",
    ]
    if "cases" in figures:
        rows = [
            {
                "group": k,
                "cases": v["cases"],
                "Triton ran": v["triton"],
                "worst error / allowed": None
                if v["worst"] is None
                else f"{v['worst']['ratio']:.3f} ({v['worst']['tensor']}, {v['worst']['case']})",
            }
            for k, v in figures["cases"].items()
        ]
        lines += _table(rows)
    for run in figures.get("runs", []):
        lines += [f"\n### {run['name']}", ""]
        lines += _table(run["summary"]["models"]) + _table(run["summary"]["modules"])
        lines += [
            "",
            "<details><summary>cbam bench's report</summary>",
            "",
            run["report"],
            "",
            "</details>",
        ]
    if "profile" in figures:
        lines += [
            "",
            "<details><summary>profile</summary>",
            "",
            "```text",
            figures["profile"],
            "```",
            "</details>",
        ]
    rest = {
        k: v for k, v in figures.items() if k not in ("cases", "runs", "profile", "failed_cases")
    }
    if rest:
        lines += ["", "```json", json.dumps(rest, indent=1, default=str), "```"]
    for line in part["skipped"]:
        lines.append(f"\nSkipped: {line}")
    for failure in part["failures"]:
        lines += [f"\n**Failed: {failure['check']}**: {failure['error']}", ""]
        if failure["traceback"]:
            lines += ["```text", failure["traceback"].rstrip(), "```"]
    for case in figures.get("failed_cases", [])[:50]:
        lines.append(f"- {case['error']}")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# GPU check: {'passed' if report['ok'] else 'FAILED'}", ""]
    if report["dry_run"]:
        lines += [
            "**Dry run on CPU** (tiny sizes, Triton interpreter, Dynamo's eager backend): "
            "it checks that the script runs; none of its figures is a GPU measurement.",
            "",
        ]
    lines += [
        f"{report['started']}, {report['seconds']} s (budget {report['budget_s']} s); "
        f"`{report['command']}`",
        "",
    ]
    lines += _table([{k: v for k, v in m.items() if k != "device"}])
    if "device" in m:
        lines += ["", *_table([m["device"]])]
    lines += [
        "",
        *_table(
            [
                {
                    "part": p["name"],
                    "status": p["status"],
                    "seconds": p["seconds"],
                    "budget s": p["budget_s"],
                    "failures": len(p["failures"]),
                }
                for p in report["parts"]
            ]
        ),
    ]
    targets = [
        t for p in report["parts"] for run in p["figures"].get("runs", []) for t in run["targets"]
    ]
    if targets:
        lines += ["", "## Targets", "", *_table(targets)]
    for part in report["parts"]:
        lines += _part_lines(part)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Parts and budgets: "
        + "; ".join(
            f"{p.name} {p.budget_s} s" + (f" (beside {p.beside})" if p.beside else "")
            for p in PARTS
        ),
    )
    parser.add_argument("--output", type=Path, help="folder for gpu_check.json and .md")
    parser.add_argument("--dry-run", action="store_true", help="on CPU with tiny sizes")
    parser.add_argument("--parts", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument("--part", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["torchrun"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part or args.worker:
        settings = Settings(args.dry_run, args.work)
        if args.part:
            run_part(args.part, settings)
        else:
            if args.dry_run:
                _eager_compile()
            torchrun_worker(settings)
        return 0
    if args.output is None:
        parser.error("--output DIR is required")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run it on a GPU machine, or use --dry-run")
    report = run_check(args.output, args.dry_run, args.parts)
    print(
        f"{'passed' if report['ok'] else 'FAILED'} in {report['seconds']} s; report: "
        f"{args.output / REPORT_NAME}.md"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
