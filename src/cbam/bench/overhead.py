"""What attention costs: plain, SE, reference CBAM, fused CBAM and timm's CBAM, side by side.

In one process and one run it times (a) each attention module alone, forward + backward, at the
feature-map size of every stage of the model, and (b) the model's training step (forward,
cross-entropy, backward, SGD step) and inference (eval mode, no grad). Variants are timed in
interleaved rounds, each round in a rotated order, and every ratio is the median over rounds of
the ratio within a round (`stats.py`), so the noise of a shared machine hits all variants
alike. Peak memory comes from `memory.py`. Eager and `torch.compile`, NCHW and channels_last,
float32 or half-precision weights, with or without autocast (`--amp`).

    python -m cbam.bench.overhead --quick          # a smoke run, well under a minute
    cbam bench --repeats 30 --modes eager compiled --memory-formats nchw channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbam._argtypes import non_negative_int, output_file, positive_int
from cbam._device import resolve_device
from cbam._errors import check_positive_int
from cbam.bench.memory import peak_memory_bytes, tensor_bytes
from cbam.bench.stats import Summary, paired_ratios, rotations, summarize
from cbam.models._registry import model_entry

VARIANTS = ("plain", "se", "cbam-reference", "cbam-fused", "cbam-fused-aten", "timm-cbam")
MODULE_VARIANTS = ("se", "cbam-reference", "cbam-fused", "cbam-fused-aten", "timm-cbam")
MODES = ("eager", "compiled")
MEMORY_FORMATS = ("nchw", "channels_last")
PARTS = ("module", "model")
_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchConfig:
    model: str = "resnet50"
    batch_size: int = 16
    image_size: int = 112
    in_chans: int = 3
    num_classes: int = 1000
    repeats: int = 20
    warmup: int = 3
    modes: tuple[str, ...] = ("eager",)
    memory_formats: tuple[str, ...] = ("nchw",)
    parts: tuple[str, ...] = PARTS
    variants: tuple[str, ...] = VARIANTS
    threads: int | None = None
    flush_denormal: bool = True
    keep_freed_memory: bool = True
    memory: bool = True
    device: str = "cpu"
    seed: int = 0
    dtype: str = "float32"  # of the weights and the inputs
    amp: str | None = None  # "bf16" or "fp16": the calls run under autocast to that dtype

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A smoke run: small batch and images, few repeats, eager NCHW only."""
        settings: dict[str, Any] = {"batch_size": 2, "image_size": 64, "repeats": 3, "warmup": 1}
        return replace(cls(**settings), **overrides)


@dataclass
class Row:
    """One variant in one comparison group: its timings and peak memory."""

    part: str  # "module", "train" or "inference"
    size: str  # e.g. "256x28x28" (module) or "resnet50 16x3x112x112"
    mode: str
    memory_format: str
    variant: str
    baseline: str
    times: list[float]
    ratio: Summary | None = None  # paired time ratio to the baseline variant
    peak_bytes: int | None = None  # tensor bytes live at the peak, model state included
    state_bytes: int | None = None  # of which live before the call: weights, grads, batch, ...
    compile_seconds: float | None = None

    @property
    def time(self) -> Summary:
        return summarize(self.times)


@dataclass
class BenchResult:
    config: BenchConfig
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def row(self, part: str, variant: str, mode: str = "eager", memory_format: str = "nchw",
            size: str | None = None) -> Row:  # fmt: skip
        for r in self.rows:
            key = (r.part, r.variant, r.mode, r.memory_format)
            if key == (part, variant, mode, memory_format) and size in (None, r.size):
                return r
        raise KeyError((part, variant, mode, memory_format, size))

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["time"] = asdict(r.time)
            rows.append(d)
        return {"config": asdict(self.config), "machine": self.machine, "rows": rows,
                "skipped": self.skipped}  # fmt: skip


# --------------------------------------------------------------------------- variants


def timm_cbam_factory() -> Callable[[int], nn.Module] | None:
    """timm's CbamModule (a dev/bench dependency), or None when timm is not installed."""
    try:
        from timm.layers.cbam import CbamModule
    except ImportError:
        return None
    return lambda channels: CbamModule(channels)


def _attention(variant: str) -> tuple[Any, dict[str, Any] | None]:
    if variant == "plain":
        return None, None
    if variant == "se":
        return "se", None
    if variant in ("cbam-reference", "cbam-fused", "cbam-fused-aten"):
        return "cbam", {"impl": variant.removeprefix("cbam-").removesuffix("-aten")}
    if variant == "timm-cbam":
        factory = timm_cbam_factory()
        if factory is None:
            raise ImportError("timm is not installed")
        return factory, None
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def variant_context(variant: str) -> contextlib.AbstractContextManager[None]:
    """What a variant's calls run under: "cbam-fused-aten" is the fused CBAM with its CPU and
    Triton kernels off (the ATen path), to show what the kernels buy in the same run."""
    from cbam import kernels

    return kernels.disabled() if variant == "cbam-fused-aten" else contextlib.nullcontext()


def precision_context(config: BenchConfig, device: torch.device) -> Any:
    """Autocast to `config.amp` around a call, or nothing: how mixed-precision users run."""
    if config.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[config.amp])


def build_model(
    variant: str, model: str = "resnet50", seed: int = 0, **model_kwargs: Any
) -> nn.Module:
    from cbam.models import create_model

    attention, kwargs = _attention(variant)
    torch.manual_seed(seed)
    return create_model(model, attention=attention, attention_kwargs=kwargs, **model_kwargs)


def build_module(variant: str, channels: int, seed: int = 0) -> nn.Module:
    from cbam.layers import CBAM, SE

    torch.manual_seed(seed)
    attention, kwargs = _attention(variant)
    if attention == "se":
        return SE(channels)
    if attention == "cbam":
        return CBAM(channels, **(kwargs or {}))
    return attention(channels)


def stage_shapes(model: str, batch_size: int, image_size: int) -> list[tuple[int, ...]]:
    """N x C x H x W of each stage's output, where that stage's attention works."""
    from cbam.models import create_model

    with torch.device("meta"):
        net = create_model(model)
    shapes: list[tuple[int, ...]] = []
    for name in net.stage_names:
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out: shapes.append(tuple(out.shape))
        )
    with torch.no_grad():
        net(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    return shapes


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_group(
    calls: dict[str, Callable[[], Any]], config: BenchConfig, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm every call up, then time them in rotated, interleaved rounds. Returns the times
    and how long each call's first run took (that is where torch.compile compiles)."""
    first: dict[str, float] = {}
    for name, call in calls.items():
        for i in range(max(config.warmup, 1)):
            start = time.perf_counter()
            call()
            _sync(device)
            if i == 0:
                first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in calls}
    for order in rotations(list(calls), config.repeats):
        for name in order:
            _sync(device)
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times, first


def _rows(
    part: str, size: str, mode: str, fmt: str, baseline: str,
    times: dict[str, list[float]], first: dict[str, float],
) -> list[Row]:  # fmt: skip
    rows = []
    for name, ts in times.items():
        ratio = summarize(paired_ratios(ts, times[baseline])) if baseline in times else None
        compile_s = first[name] if mode == "compiled" else None
        rows.append(Row(part, size, mode, fmt, name, baseline, ts, ratio, None, None, compile_s))
    return rows


def _maybe_compile(module: nn.Module, mode: str) -> Callable[..., Any]:
    return torch.compile(module) if mode == "compiled" else module


def _module_group(
    config: BenchConfig, shape: tuple[int, ...], mode: str, fmt: str, device: torch.device,
    variants: Sequence[str],
) -> list[Row]:  # fmt: skip
    _, c, h, w = shape
    layout = {"dtype": DTYPES[config.dtype], "memory_format": _FORMATS[fmt]}
    g = torch.Generator().manual_seed(config.seed)
    x = torch.randn(shape, generator=g).to(device, **layout)
    x.requires_grad_(True)
    grad = torch.randn(shape, generator=g).to(device, **layout)
    calls: dict[str, Callable[[], Any]] = {}
    modules: dict[str, nn.Module] = {}
    for variant in variants:
        module = build_module(variant, c, config.seed).to(device, **layout)
        module.train()
        modules[variant] = module
        run = _maybe_compile(module, mode)

        def call(module: nn.Module = module, run: Callable[..., Any] = run,
                 variant: str = variant) -> None:  # fmt: skip
            x.grad = None
            for p in module.parameters():
                p.grad = None
            with precision_context(config, device), variant_context(variant):
                out = run(x)
            out.backward(grad.to(out.dtype))

        calls[variant] = call
    baseline = "timm-cbam" if "timm-cbam" in calls else next(iter(calls))
    times, first = _time_group(calls, config, device)
    rows = _rows("module", f"{c}x{h}x{w}", mode, fmt, baseline, times, first)
    if config.memory:
        for row in rows:
            module = modules[row.variant]
            row.state_bytes = tensor_bytes([x, grad, *module.parameters(), *module.buffers()])
            row.peak_bytes = row.state_bytes + peak_memory_bytes(calls[row.variant], device)
    return rows


def train_step(
    model: nn.Module,
    run: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: BenchConfig,
    variant: str,
) -> None:
    """One timed training step: forward (`run`, the model or its compiled form), cross-entropy,
    backward outside autocast as AMP recipes do, SGD step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with precision_context(config, images.device), variant_context(variant):
        loss = F.cross_entropy(run(images), labels)
    loss.backward()
    optimizer.step()


def _model_groups(
    config: BenchConfig, mode: str, fmt: str, device: torch.device, variants: Sequence[str]
) -> list[Row]:
    layout = {"dtype": DTYPES[config.dtype], "memory_format": _FORMATS[fmt]}
    b, s = config.batch_size, config.image_size
    g = torch.Generator().manual_seed(config.seed)
    images = torch.randn(b, config.in_chans, s, s, generator=g).to(device, **layout)
    labels = torch.randint(0, config.num_classes, (b,), generator=g).to(device)
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    train_calls: dict[str, Callable[[], Any]] = {}
    infer_calls: dict[str, Callable[[], Any]] = {}
    for variant in variants:
        model = build_model(
            variant, config.model, config.seed,
            in_chans=config.in_chans, num_classes=config.num_classes,
        )  # fmt: skip
        model = model.to(device, **layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        run = _maybe_compile(model, mode)
        models[variant], optimizers[variant] = model, optimizer

        def train(model: nn.Module = model, run: Callable[..., Any] = run,
                  optimizer: torch.optim.Optimizer = optimizer,
                  variant: str = variant) -> None:  # fmt: skip
            train_step(model, run, optimizer, images, labels, config, variant)

        def infer(model: nn.Module = model, run: Callable[..., Any] = run,
                  variant: str = variant) -> None:  # fmt: skip
            model.eval()
            with torch.no_grad(), precision_context(config, device), variant_context(variant):
                run(images)

        train_calls[variant], infer_calls[variant] = train, infer
    size = f"{config.model} {b}x{config.in_chans}x{s}x{s}"
    baseline = "plain" if "plain" in variants else variants[0]
    rows: list[Row] = []
    for part, calls in (("train", train_calls), ("inference", infer_calls)):
        times, first = _time_group(calls, config, device)
        part_rows = _rows(part, size, mode, fmt, baseline, times, first)
        if config.memory:
            for row in part_rows:
                model, optimizer = models[row.variant], optimizers[row.variant]
                state = [images, labels, *model.parameters(), *model.buffers()]
                if part == "train":
                    # Not the gradients: the step frees them first (set_to_none) and
                    # allocates new ones, which the profiler sees; it does not see the frees
                    # of what was allocated before it started, so they would count twice.
                    state.append(optimizer.state_dict())
                row.state_bytes = tensor_bytes(state)
                row.peak_bytes = row.state_bytes + peak_memory_bytes(calls[row.variant], device)
        rows += part_rows
    return rows


# --------------------------------------------------------------------------- running


def machine_info(config: BenchConfig) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flush_denormal": config.flush_denormal,
        "device": config.device,
    }
    if config.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    return info


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory it frees (no trimming, maps up to 32 MiB from the
    heap); False where there is no glibc.

    By default it hands big freed blocks back to the OS and page-faults them back in on the
    next allocation, and how often depends on the heap's history, not on the model: in one
    process plain ResNet-50 inference (batch 16, 112 px) took 19-27k page faults and ~150 ms
    per forward, in another ~300 and ~115 ms. Whichever variant met it first looked 20-30%
    slower. (PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason.)"""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_overhead(config: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResult:
    """Run every comparison group of `config`; `log` gets a line per finished group."""
    for name, values, allowed in (
        ("mode", config.modes, MODES),
        ("memory format", config.memory_formats, MEMORY_FORMATS),
        ("part", config.parts, PARTS),
        ("variant", config.variants, VARIANTS),
        ("dtype", (config.dtype,), tuple(DTYPES)),
        ("amp dtype", () if config.amp is None else (config.amp,), tuple(AMP_DTYPES)),
    ):
        for value in values:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
    for name in ("batch_size", "image_size", "in_chans", "num_classes", "repeats"):
        check_positive_int(name, getattr(config, name))
    if config.threads is not None:
        check_positive_int("threads", config.threads)
    if isinstance(config.warmup, bool) or not isinstance(config.warmup, int) or config.warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {config.warmup!r}")
    model_entry(config.model)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if "compiled" in config.modes:
        # Every variant's model shares ResNet.forward's code: each (variant, train/eval) is a
        # cache entry of that code, more than Dynamo's default limit of 8, past which it
        # would silently run the rest eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        limit = torch._dynamo.config.accumulated_recompile_limit
        torch._dynamo.config.accumulated_recompile_limit = max(limit, 1024)
    torch.set_flush_denormal(config.flush_denormal)  # process-wide: x86 is slow on subnormals
    result = BenchResult(config, machine_info(config))
    result.machine["keep_freed_memory"] = config.keep_freed_memory and keep_freed_memory()
    result.machine["load_before"] = _load()
    variants = list(config.variants)
    if "timm-cbam" in variants and timm_cbam_factory() is None:
        variants.remove("timm-cbam")
        result.skipped.append("timm-cbam: timm is not installed (pip install 'cbam[dev]')")
    started = time.perf_counter()
    for mode in config.modes:
        for fmt in config.memory_formats:
            if "module" in config.parts:
                module_variants = [v for v in variants if v in MODULE_VARIANTS]
                for shape in stage_shapes(config.model, config.batch_size, config.image_size):
                    torch._dynamo.reset()
                    result.rows += _module_group(config, shape, mode, fmt, device, module_variants)
                    if log:
                        log(f"module {shape[1:]} {mode} {fmt} done")
            if "model" in config.parts:
                torch._dynamo.reset()
                result.rows += _model_groups(config, mode, fmt, device, variants)
                if log:
                    log(f"{config.model} {mode} {fmt} done")
    result.machine["load_after"] = _load()
    result.machine["seconds"] = round(time.perf_counter() - started, 1)
    return result


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _activations(row: Row | None) -> int | None:
    """Peak bytes above the model state: activations kept for the backward and temporaries."""
    if row is None or row.peak_bytes is None or row.state_bytes is None:
        return None
    return row.peak_bytes - row.state_bytes


def _ratio(a: int | None, b: int | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else ""


def _load_text(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}"


def format_report(result: BenchResult) -> str:
    """Markdown: one table per (part, mode, memory format), then the machine."""
    lines: list[str] = []
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in result.rows:
        groups.setdefault((row.part, row.mode, row.memory_format), []).append(row)
    c = result.config
    precision = "" if c.dtype == "float32" else f", {c.dtype}"
    precision += "" if c.amp is None else f", {c.amp} autocast"
    for (part, mode, fmt), rows in groups.items():
        baseline = rows[0].baseline
        if part == "module":
            lines.append(f"\n### Module alone, forward + backward ({mode}, {fmt}{precision})\n")
            lines.append(f"| size | variant | median ms | IQR | x {baseline} | {baseline} / this "
                         f"| peak MB | above input MB |")  # fmt: skip
            lines.append("|---|---|---|---|---|---|---|---|")
        else:
            lines.append(f"\n### {rows[0].size}: {part} ({mode}, {fmt}{precision})\n")
            lines.append(f"| variant | median ms | IQR | x {baseline} (paired) | peak MB "
                         f"| x {baseline} | activations MB | x {baseline} |")  # fmt: skip
            lines.append("|---|---|---|---|---|---|---|---|")
        by_variant = {(r.size, r.variant): r for r in rows}
        for row in rows:
            t = row.time
            iqr = f"±{100 * t.spread / 2:.1f}%"
            ratio = f"{row.ratio.median:.3f}" if row.ratio else ""
            base = by_variant.get((row.size, baseline))
            act, base_act = _activations(row), _activations(base)
            if part == "module":
                speedup = f"{1 / row.ratio.median:.2f}" if row.ratio else ""
                lines.append(f"| {row.size} | {row.variant} | {_ms(t.median)} | {iqr} | {ratio} "
                             f"| {speedup} | {_mb(row.peak_bytes)} | {_mb(act)} |")  # fmt: skip
            else:
                base_peak = base.peak_bytes if base is not None else None
                lines.append(f"| {row.variant} | {_ms(t.median)} | {iqr} | {ratio} "
                             f"| {_mb(row.peak_bytes)} | {_ratio(row.peak_bytes, base_peak)} "
                             f"| {_mb(act)} | {_ratio(act, base_act)} |")  # fmt: skip
        compiled = [r for r in rows if r.compile_seconds is not None]
        if compiled:
            firsts = ", ".join(f"{r.variant} {r.compile_seconds:.0f} s" for r in compiled)
            lines.append(f"\nFirst call (compilation included): {firsts}.")
    m = result.machine
    lines.append(
        f"\n{c.repeats} interleaved rounds after {c.warmup} warm-up calls; median time, IQR as "
        f"± half the interquartile range over the median, ratios are the median of per-round "
        f"ratios. Peak MB: tensor memory live at the peak (profiler allocation events on CPU), "
        f"model state included; activations MB: the peak above the state live throughout the "
        f"call (weights, optimizer state, batch; a training step frees the old gradients first, "
        f"so its new ones count here)."
    )
    lines.append(
        f"\nMachine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"({m['cpu_capability']}), {m['torch_threads']} threads, flush denormals "
        f"{'on' if m['flush_denormal'] else 'off'}, malloc keeps freed memory "
        f"{'on' if m.get('keep_freed_memory') else 'off'}, timm {m['timm']}, python {m['python']}; "
        f"load average {_load_text(m['load_before'])} before, {_load_text(m['load_after'])} "
        f"after (other processes on the machine); {m['seconds']} s."
    )
    for note in result.skipped:
        lines.append(f"\nSkipped {note}")
    return "\n".join(lines).lstrip("\n")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    parser.add_argument("--model", default=defaults.model, help="default: resnet50")
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="default: 16 (quick: 2)"
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=None, help="default: 112 (quick: 64)"
    )
    parser.add_argument(
        "--in-chans", type=positive_int, default=defaults.in_chans, help="default: 3"
    )
    parser.add_argument(
        "--num-classes", type=positive_int, default=defaults.num_classes, help="default: 1000"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timed rounds (default: 20)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=None, help="untimed calls (default: 3)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager"])
    parser.add_argument("--memory-formats", nargs="+", choices=MEMORY_FORMATS, default=["nchw"])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu (measured here) or cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and inputs")
    parser.add_argument(
        "--amp", choices=AMP_DTYPES,
        help="run each call under autocast to this dtype (fp16 without a grad scaler: timing "
        "only); the fused CBAM keeps the map in that dtype and accumulates in fp32",
    )  # fmt: skip
    parser.add_argument(
        "--keep-denormals", action="store_true",
        help="leave subnormal floats on (default: flushed, as x86 is slow on them)",
    )  # fmt: skip
    parser.add_argument(
        "--return-freed-memory", action="store_true",
        help="leave glibc's malloc returning freed memory to the OS (default: kept, as the "
        "page faults that follow land on whichever variant runs next)",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument(
        "--json", type=output_file, metavar="PATH", help="also write every timing as JSON"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: batch 2, 64 px, 3 rounds, 1 warm-up (well under a minute)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = BenchConfig.quick() if args.quick else BenchConfig()
    overrides: dict[str, Any] = {
        "model": args.model,
        "in_chans": args.in_chans,
        "num_classes": args.num_classes,
        "modes": tuple(args.modes),
        "memory_formats": tuple(args.memory_formats),
        "parts": tuple(args.parts),
        "variants": tuple(args.variants),
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "amp": args.amp,
        "flush_denormal": not args.keep_denormals,
        "keep_freed_memory": not args.return_freed_memory,
        "memory": not args.no_memory,
    }
    for name in ("batch_size", "image_size", "repeats", "warmup"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return replace(base, **overrides)


def run_from_args(args: argparse.Namespace) -> int:
    import json

    config = config_from_args(args)
    result = run_overhead(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cbam.bench.overhead", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
